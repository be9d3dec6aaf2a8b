"""fatebook.widgets without a browser (fastai's widget pattern): set control values, check the estimator state, the
images and the messages. On the preprocessed pancreas (2,531 cells; 2,000 of the original 27,998 genes, see
../shared/data/README.md) unless a test says otherwise. The browser test is tests/test_widgets_browser.py."""
from __future__ import annotations
import hashlib

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ipywidgets")
import matplotlib
matplotlib.use("agg")

from fatebook.core import Key, settings
from fatebook.kernels import ConnectivityKernel, VelocityKernel, PseudotimeKernel
from fatebook.gpcca import GPCCA
from fatebook import widgets as fw


def _fingerprint(adata) -> str:
    "A hash of everything in an AnnData's containers (keys, and the bytes of obs/obsm/obsp/layers arrays)."
    h = hashlib.sha256()
    h.update(repr(sorted(adata.obs.columns)).encode()); h.update(pd.util.hash_pandas_object(adata.obs, index=True).values.tobytes())
    for slot in ("obsm", "obsp", "layers", "varm", "uns"):
        c = getattr(adata, slot)
        h.update(repr(sorted(c.keys())).encode())
        if slot == "uns": continue
        for k in sorted(c.keys()):
            v = c[k]
            h.update((v.data if hasattr(v, "data") and not isinstance(v, np.ndarray) else np.asarray(v)).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def pancreas(_pancreas_pp_session):
    return _pancreas_pp_session.copy()


@pytest.fixture(scope="module")
def explorer(pancreas):
    before = _fingerprint(pancreas)
    ex = fw.explore(pancreas, time_key="dpt_pseudotime")
    ex._before = before
    return ex


def test_kernel_tab_matches_hand_built_kernel(explorer, pancreas):
    t = explorer.tuner
    vk = VelocityKernel(pancreas).compute_transition_matrix()
    ck = ConnectivityKernel(pancreas).compute_transition_matrix()
    ref = (0.8 * vk + 0.2 * ck).compute_transition_matrix()
    assert abs(t.kernel.transition_matrix - ref.transition_matrix).max() < 1e-12
    d = t.diagnostics
    assert d["softmax_scale"] == pytest.approx(vk.params["softmax_scale"]) and d["softmax_scale_estimated"]
    # velocity on pancreas points towards later DPT: most one-step mass and most walks move forward
    assert d["step_forward"] > 0.5 and d["walks_forward"] > 0.6
    assert f"{d['softmax_scale']:.3g}" in t.message and "(estimated)" in t.message


def test_weights_recombine_cached_kernels(explorer):
    t = explorer.tuner
    n0 = {k: t.calls[k] for k in ("velocity", "connectivity", "pseudotime")}
    png0 = bytes(t.views.out["projection"].value)
    for w in (0.5, 0.3, 0.2):
        t.w["connectivity_weight"].value = w
        assert t.params["connectivity_weight"] == w
    t.w["pseudotime_weight"].value = 0.4
    t.w["pseudotime_weight"].value = 0.0
    assert t.calls["velocity"] == n0["velocity"] and t.calls["connectivity"] == n0["connectivity"]   # never recomputed
    assert t.calls["pseudotime"] == n0["pseudotime"] + 1                                              # once, then cached
    assert bytes(t.views.out["projection"].value) == png0      # back at 0.8/0.2: the same figure, byte for byte
    t.w["connectivity_weight"].value = 0.5
    assert bytes(t.views.out["projection"].value) != png0
    np.testing.assert_allclose(t.kernel.weights, [0.8 / 1.3, 0.5 / 1.3])
    t.set(connectivity_weight=0.2)


def test_softmax_scale_recomputes_the_velocity_kernel_once_per_value(explorer):
    t = explorer.tuner
    n0 = t.calls["velocity"]
    for s in (2.0, 20.0, 2.0, 20.0):
        t.w["softmax_scale"].value = s
        assert t.kernel.leaves()[0].params["softmax_scale"] == pytest.approx(s)
        assert not t.w["estimate_scale"].value
    assert t.calls["velocity"] == n0 + 2
    t.w["estimate_scale"].value = True          # back to the estimate: cached
    assert t.params["softmax_scale"] is None and t.calls["velocity"] == n0 + 2


def test_kernel_errors_keep_the_previous_kernel(explorer, monkeypatch):
    t = explorer.tuner
    k0, png0 = t.kernel, bytes(t.views.out["projection"].value)
    t.w["connectivity_weight"].value = 0.0
    t.w["velocity_weight"].value = 0.0           # nothing left
    assert t.status.kind == "error" and "Every kernel weight is 0" in t.message and "Traceback" not in t.message
    assert t.w["velocity_weight"].value == 0.8   # the slider shows the valid value again
    t.set(connectivity_weight=0.2)
    # an unexpected failure inside a kernel: a message, never a traceback; the previous kernel stays
    k0 = t.kernel
    def boom(self, *a, **k): raise np.linalg.LinAlgError("singular matrix")
    monkeypatch.setattr(VelocityKernel, "compute_transition_matrix", boom)
    t.w["similarity"].value = "cosine"
    assert t.status.kind == "error" and t.message.startswith("LinAlgError: singular matrix")
    assert t.kernel is k0 and t.params["similarity"] == "correlation" and t.w["similarity"].value == "correlation"
    assert isinstance(t.last_error, np.linalg.LinAlgError)


def test_macrostates_cache_schur_and_memberships(explorer):
    ex = explorer
    assert ex.show("macrostates")
    m = ex.macro
    g = m.estimator
    X, forb = g.schur_vectors, g.eigendecomposition["forbidden"]
    assert m.calls["schur"] == 1 and forb, "pancreas has complex eigenvalue pairs among the top 20"
    labels = dict((v, l) for l, v in m.w["n_states"].options)
    assert all("splits a complex pair" in labels[f] for f in forb if f in labels)
    valid = [k for k in range(3, 8) if k not in forb]
    runs = []                                   # every real run of the crispness optimisation
    orig = m.memo._orig
    m.memo._orig = lambda X, *a, **k: runs.append(a[0] if a else k.get("m")) or orig(X, *a, **k)
    for k in valid + valid[:2]:
        m.w["n_states"].value = k
        assert m.estimator.macrostates.cat.categories.size == k
    m.memo._orig = orig
    assert m.calls["schur"] == 1 and m.estimator.schur_vectors is X       # never recomputed
    assert sorted(runs) == sorted(set(valid) - {g.params["macrostates"]["n_states"]})   # each new number once
    # a forbidden number: flagged, the previous macrostates stay
    before = m.estimator
    m.w["n_states"].value = forb[0]
    assert m.status.kind == "error" and "split a complex conjugate pair" in m.message
    assert m.estimator is before and m.w["n_states"].value == before.macrostates.cat.categories.size
    # the same macrostates as a hand-built GPCCA with those parameters
    ref = GPCCA(ex.kernel).compute_schur(n_components=20)
    ref.compute_macrostates(n_states=valid[1], n_cells=30, cluster_key="clusters")
    np.testing.assert_allclose(np.asarray(m.estimator.macrostates_memberships), np.asarray(ref.macrostates_memberships), atol=1e-10)
    assert list(m.estimator.macrostates.cat.categories) == list(ref.macrostates.cat.categories)
    cand = m.candidates()
    assert cand.loc[forb[0], "forbidden"] and "complex pair" in cand.loc[forb[0], "note"]
    assert np.isfinite(cand.loc[valid[0], "crispness"]) and np.isfinite(cand.loc[valid[0], "minChi"])


def test_fates_states_merge_and_code(explorer, pancreas):
    ex = explorer
    ex.macro.set(n_states=valid_n(ex, 6))
    assert ex.show("fates")
    f = ex.fates
    names = f.names()
    alpha, beta = _first(names, "Alpha"), _first(names, "Beta")
    f.w["terminal_states"].value = (alpha, beta)
    assert list(f.estimator.fate_probabilities.names) == sorted([alpha, beta], key=names.index)
    f.w["merge"].value = f"{alpha}, {beta}"
    assert list(f.estimator.fate_probabilities.names) == [f"{alpha}, {beta}"]
    np.testing.assert_allclose(np.asarray(f.estimator.fate_probabilities), 1.0)   # one lineage: every cell reaches it
    f.w["merge"].value = ""
    n_fates = f.calls["fates"]
    f.w["merge"].value = f"{alpha}, Nope"                       # an unknown state: refused, fates kept
    assert "Unknown state(s) ['Nope']" in f.message and f.calls["fates"] == n_fates
    # drivers and absorption times are computed when shown
    assert f.estimator.lineage_drivers is None
    f.views.show("drivers")
    top = f.drivers_table(5)
    assert set(top.lineage) == {alpha, beta} and len(top) == 10
    assert "Gcg" in set(top[top.lineage == alpha].gene)        # glucagon drives the alpha lineage
    # the printed code reproduces the widget's estimator on a fresh AnnData
    a = pancreas.copy()
    k, g = ex.apply(a)
    np.testing.assert_allclose(np.asarray(g.fate_probabilities), np.asarray(ex.estimator.fate_probabilities), atol=1e-10)
    assert list(g.terminal_states.cat.categories) == list(ex.estimator.terminal_states.cat.categories)
    assert Key.obsp.T() in a.obsp and Key.obs.term_states() in a.obs and Key.varm.drivers() in a.varm
    assert Key.obsm.fate_probs() in a.obsm and Key.obsm.absorption_times() in a.obsm
    assert _fingerprint(pancreas) == ex._before, "tuning must never write into the user's AnnData"


def test_clusters_source_with_merge_reproduced_by_code(explorer, pancreas):
    ex = explorer
    f = ex.fates
    f.set(source="clusters")
    f.set(terminal_states=["Alpha", "Beta", "Delta", "Epsilon"], merge="Delta, Epsilon", initial_states=["Ngn3 low EP"])
    assert f.status.kind != "error", f.message
    assert list(f.estimator.fate_probabilities.names) == ["Beta", "Alpha", "Delta, Epsilon"] or \
        set(f.estimator.fate_probabilities.names) == {"Alpha", "Beta", "Delta, Epsilon"}
    code = ex.code()
    assert "isin(['Delta', 'Epsilon'])" in code
    a = pancreas.copy()
    _, g = ex.apply(a)
    np.testing.assert_allclose(np.asarray(g.fate_probabilities), np.asarray(ex.estimator.fate_probabilities), atol=1e-10)
    f.set(source="macrostates")


def test_apply_restores_the_anndata_on_failure(explorer, pancreas, monkeypatch):
    a = pancreas.copy()
    before = _fingerprint(a)
    code = explorer.code()
    monkeypatch.setattr(fw.Explorer, "code", lambda self: code + "raise RuntimeError('stop half-way')\n")
    with pytest.raises(RuntimeError, match="half-way"):
        explorer.apply(a)
    assert _fingerprint(a) == before


def test_backward_process(pancreas):
    ex = fw.explore(pancreas, backward=True, n_states=3)
    assert ex.kernel.backward is True
    assert ex.show("fates"), ex.fates.message
    code = ex.code()
    assert "VelocityKernel(adata, backward=True)" in code
    a = pancreas.copy()
    _, g = ex.apply(a)
    assert g.backward and Key.obsm.fate_probs(True) in a.obsm and Key.obsm.fate_probs(False) not in a.obsm


def valid_n(ex, k):
    forb = ex.macro.estimator.eigendecomposition["forbidden"]
    while k in forb: k += 1
    return k


def _first(names, prefix):
    return next(n for n in names if n.startswith(prefix))


# ---- bad inputs: each shows a message naming the problem and the fix, keeps the previous result, never a traceback
@pytest.fixture(scope="module")
def dg_explorer(_dg_cache):
    a = _dg_cache(200).copy()
    ex = fw.explore(a, time_key="dpt_pseudotime", n_states=4, n_cells=20)
    assert ex.show("fates"), ex.fates.message
    return ex


def _forbidden(ex):
    return ex.macro.estimator.eigendecomposition["forbidden"][0]


BAD = {
    "all kernel weights 0": ("tuner", lambda ex: ex.tuner.set(velocity_weight=0.0, connectivity_weight=0.0),
                             ["Every kernel weight is 0", "give at least one kernel a weight > 0"]),
    "softmax_scale <= 0": ("tuner", lambda ex: ex.tuner.set(softmax_scale=0.0),
                           ["softmax_scale=0.0 is out of range", "Use None to estimate it"]),
    "unknown similarity": ("tuner", lambda ex: ex.tuner.set(similarity="cosinus"),
                           ["similarity='cosinus' is not valid", "Did you mean 'cosine'?"]),
    "forbidden n_states": ("macro", lambda ex: ex.macro.set(n_states=_forbidden(ex)),
                           ["would split a complex conjugate pair", "choose"]),
    "n_cells too large": ("macro", lambda ex: ex.macro.set(n_cells=150), ["n_cells=150", "n_cells <="]),
    "n_states above the Schur vectors": ("macro", lambda ex: ex.macro.set(n_states=40, n_cells=2),
                                         ["number of Schur vectors", "compute_schur(n_components="]),
    "unknown cluster_key": ("macro", lambda ex: ex.macro.set(cluster_key="nope"), ["cluster_key='nope'", "valid"]),
    "n_components < 3": ("macro", lambda ex: ex.macro.set(n_components=1), ["n_components=1 is out of range", "Schur vector"]),
    "no terminal state": ("fates", lambda ex: ex.fates.set(terminal_states=[], merge=""),
                          ["Select at least one terminal state", "choices"]),
    "unknown state in merge": ("fates", lambda ex: ex.fates.set(merge="Astrocytes, Nope"),
                               ["Unknown state(s) ['Nope']", "valid:"]),
    "state both initial and terminal": ("fates", lambda ex: ex.fates.set(initial_states=ex.fates.params["terminal_states"][:1]),
                                        ["both as terminal and as initial", "tick allow_overlap"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_messages(dg_explorer, case):
    ex = dg_explorer
    which, act, expected = BAD[case]
    pane = {"tuner": ex.tuner, "macro": ex.macro, "fates": ex.fates}[which]
    before = (ex.tuner.kernel, ex.macro.estimator, ex.fates.estimator, dict(pane.params))
    assert act(ex) is False
    assert pane.status.kind == "error" and "Traceback" not in pane.message
    for text in expected: assert text in pane.message, (case, pane.message)
    assert "previous result is kept" in pane.message
    assert (ex.tuner.kernel, ex.macro.estimator, ex.fates.estimator) == before[:3]   # nothing replaced
    assert pane.params == before[3]


def test_state_with_no_cells_from_clusters(_dg_cache):
    a = _dg_cache(200).copy()
    a.obs["clusters"] = a.obs["clusters"].cat.add_categories(["Ductal"])   # e.g. left over after subsetting
    ex = fw.explore(a, n_states=4, n_cells=20)
    assert ex.show("fates")
    f = ex.fates
    assert f.set(source="clusters") and f.params["source"] == "clusters"
    labels = dict((v, l) for l, v in f.w["terminal_states"].options)
    assert labels["Ductal"] == "Ductal (0 cells!)"
    g0 = f.estimator
    assert f.set(terminal_states=["Astrocytes", "Ductal"], initial_states=[]) is False
    assert "['Ductal'] have no cells" in f.message and "remove_unused_categories()" in f.message
    assert f.estimator is g0


def test_inputs_that_are_missing(_dg_cache):
    a = _dg_cache(200).copy()
    with pytest.raises(Exception, match=r"X_tsne.*scanpy.tl.umap|scanpy.tl.umap.*X_tsne"):
        fw.explore(a, basis="tsne")
    with pytest.raises(ValueError, match=r"is a view.*\.copy\(\)"):
        fw.explore(a[:100])
    b = a.copy(); del b.layers["velocity"]
    ex = fw.explore(b, time_key="dpt_pseudotime")
    v = ex.tuner.w["velocity_weight"]
    assert v.disabled and "no `adata.layers['velocity']`" in v.tooltip and "preprocess" in v.tooltip
    assert ex.tuner.params["velocity_weight"] == 0 and ex.tuner.params["pseudotime_weight"] == 0.8   # falls back
    assert "PseudotimeKernel" in ex.code() and "VelocityKernel" not in ex.code()


def test_explore_with_the_tutorials_choice(pancreas):
    "The tutorial's cell: explore() started from a chosen n_states and terminal states reproduces the plain pipeline."
    k = (0.8 * VelocityKernel(pancreas).compute_transition_matrix()
         + 0.2 * ConnectivityKernel(pancreas).compute_transition_matrix()).compute_transition_matrix()
    g = GPCCA(k).compute_schur(n_components=20)
    n = next(n for n in (6, 7, 5, 9) if n not in g.eigendecomposition["forbidden"])
    g.compute_macrostates(n_states=n, cluster_key="clusters")
    ends = [x for x in map(str, g.macrostates.cat.categories) if x.split("_")[0] in ("Alpha", "Beta", "Delta", "Epsilon")]
    g.set_terminal_states_from_macrostates(ends).compute_fate_probabilities()
    ex = fw.explore(pancreas, time_key="dpt_pseudotime", n_states=n, terminal_states=ends)
    assert ex.show("fates"), ex.fates.message
    assert list(ex.estimator.fate_probabilities.names) == list(g.fate_probabilities.names)
    np.testing.assert_allclose(np.asarray(ex.estimator.fate_probabilities), np.asarray(g.fate_probabilities), atol=1e-8)
    assert f"set_terminal_states_from_macrostates({ends!r})" in ex.code()


def test_a_step_failing_half_way_leaves_the_anndata_as_it_was(_dg_cache, monkeypatch):
    "The standalone panes write into the AnnData of the estimator they get; a step that fails after writing part of its"
    " results (here: terminal states set, fates failing) restores it."
    a = _dg_cache(200).copy()
    k = (0.8 * VelocityKernel(a).compute_transition_matrix() + 0.2 * ConnectivityKernel(a).compute_transition_matrix())
    m = fw.MacrostateExplorer(k.compute_transition_matrix(), n_states=4, n_cells=20)
    f = fw.FateExplorer(m.estimator)
    assert f.estimator.fate_probabilities is not None and Key.obsm.fate_probs() in a.obsm
    snap = {s: dict(getattr(a, s)) for s in ("obsm", "obsp", "uns", "varm")}
    obs = a.obs.copy()
    g0, fates0 = f.estimator, a.obsm[Key.obsm.fate_probs()]
    def boom(self, *args, **kw): raise np.linalg.LinAlgError("GMRES broke down")
    monkeypatch.setattr(GPCCA, "compute_fate_probabilities", boom)
    names = f.names()
    assert f.set(terminal_states=list(f.params["terminal_states"][:1])) is False   # one lineage fewer: fates recomputed
    assert f.message.startswith("LinAlgError: GMRES broke down") and f.estimator is g0
    for s, d in snap.items():
        assert set(getattr(a, s).keys()) == set(d) and all(getattr(a, s)[key] is v for key, v in d.items()), s
    pd.testing.assert_frame_equal(a.obs, obs)
    assert a.obsm[Key.obsm.fate_probs()] is fates0


# ---- E2: the claims counted on the real calls, the background optimisation, hostile data, the code round trips ------
def _count(monkeypatch, owner, name, counter, key):
    "Wrap `owner.name` so that every real call adds one to `counter[key]`."
    orig = getattr(owner, name)
    def wrapped(*a, **k):
        counter[key] += 1
        return orig(*a, **k)
    monkeypatch.setattr(owner, name, wrapped)


@pytest.fixture
def real_calls(monkeypatch):
    "Counts of the real computations: each kernel's transition matrix and the Schur decompositions (GPCCA memberships:"
    " counted at the widget's boundary, `memo._orig`, the library's `gpcca_memberships`)."
    import collections, fatebook.schur
    n = collections.Counter()
    for cls in (VelocityKernel, ConnectivityKernel, PseudotimeKernel):
        _count(monkeypatch, cls, "compute_transition_matrix", n, cls.__name__)
    _count(monkeypatch, fatebook.schur, "sorted_schur", n, "schur")
    return n


def _working_n_states(m, candidates, k: int = 1) -> list[int]:
    "The first `k` of `candidates` that the library can turn into macrostates with the pane's n_cells (tried on a fork)."
    out = []
    forb = m.estimator.eigendecomposition["forbidden"]
    for n in candidates:
        if n in forb or n == m.params["n_states"]: continue
        g, snap = fw.fork(m.estimator), fw._snapshot(m.estimator.adata)
        try:
            with fw.quiet([]): g.compute_macrostates(n_states=n, n_cells=m.params["n_cells"], cluster_key=m.params["cluster_key"])
        except Exception: continue
        finally: fw._restore(m.estimator.adata, snap)   # the pane's AnnData as it was
        out.append(n)
        if len(out) == k: break
    assert len(out) == k, f"fewer than {k} usable n_states among {candidates}"
    return out


def test_caches_counted_on_the_real_calls(_dg_cache, real_calls):
    "New weights never recompute a kernel; a new n_states never recomputes the Schur vectors; each n_states is optimised"
    " once; n_components and kernels seen before take their Schur vectors from the cache."
    ex = fw.explore(_dg_cache(200).copy(), time_key="dpt_pseudotime", n_states=4, n_cells=20)
    t, m = ex.tuner, ex.macro
    built = dict(real_calls)
    assert built["VelocityKernel"] == 1 and built["ConnectivityKernel"] == 1
    for w in (0.5, 0.3, 0.0, 1.0, 0.2):
        t.w["connectivity_weight"].value = w
    t.w["velocity_weight"].value = 0.6; t.w["velocity_weight"].value = 0.8
    t.w["pseudotime_weight"].value = 0.3; t.w["pseudotime_weight"].value = 0.5; t.w["pseudotime_weight"].value = 0.0
    assert real_calls["VelocityKernel"] == 1 and real_calls["ConnectivityKernel"] == 1   # weights only re-add them
    assert real_calls["PseudotimeKernel"] == 1                                            # once, then cached
    assert ex.show("macrostates")
    assert real_calls["schur"] == 1
    orig, runs = m.memo._orig, []
    m.memo._orig = lambda X, k, *a, **kw: runs.append(k) or orig(X, k, *a, **kw)   # every call into the library
    ok = []
    for k in range(2, 9):                                            # new numbers (some may be forbidden or fail)
        if m.set(n_states=k): ok.append(k)
    assert len(ok) >= 3, m.message
    assert sorted(runs) == sorted(set(runs)) and 4 not in runs      # once per new number; 4 (shown first) not again
    n_runs = len(runs)
    for k in ok + ok:
        m.w["n_states"].value = k
        assert m.params["n_states"] == k
    assert len(runs) == n_runs                                       # numbers seen before: from the cache
    assert real_calls["schur"] == 1                                  # n_states never recomputes the Schur vectors
    m.memo._orig = orig
    m.set(n_states=4)
    m.w["n_components"].value = 12; m.w["n_components"].value = 20
    assert real_calls["schur"] == 2                                  # 12 is new; 20 comes back from the cache
    assert m.estimator.schur_vectors.shape[1] in (20, 21) and m.estimator.macrostates is not None
    t.w["connectivity_weight"].value = 0.5; assert ex.show("macrostates")
    t.w["connectivity_weight"].value = 0.2; assert ex.show("macrostates")
    assert real_calls["schur"] == 3                                  # the 0.5 kernel is new; 0.2 is the first one again
    assert real_calls["VelocityKernel"] == 1 and real_calls["ConnectivityKernel"] == 1
    # the cached Schur vectors are written back: the AnnData holds those of the kernel in use
    np.testing.assert_array_equal(ex.work.obsm[Key.obsm.schur_vectors()], m.estimator.schur_vectors)
    ref = GPCCA(ex.kernel).compute_schur(n_components=20)
    np.testing.assert_allclose(np.abs(m.estimator.schur_vectors), np.abs(ref.schur_vectors), atol=1e-8)


def test_initial_states_alone_keep_the_fates(dg_explorer_fresh):
    ex = dg_explorer_fresh
    f = ex.fates
    n = f.calls["fates"]
    other = [x for x in f.names() if x not in f.params["terminal_states"]]
    for ini in ((), other[:1], ()):
        assert f.set(initial_states=ini), f.message
        assert f.calls["fates"] == n and f.estimator.fate_probabilities is not None
        assert (f.estimator.initial_states is None) == (not ini)
    assert Key.obs.init_states() not in ex.work.obs          # cleared with its AnnData keys
    assert "set_initial_states" not in ex.code()


@pytest.fixture
def dg_explorer_fresh(_dg_cache):
    ex = fw.explore(_dg_cache(200).copy(), time_key="dpt_pseudotime", n_states=4, n_cells=20)
    assert ex.show("fates"), ex.fates.message
    return ex


def test_a_failed_first_visit_removes_its_preview(dg_explorer_fresh, monkeypatch):
    "The preview of a first-visited n_states is replaced by the optimised result; if the optimisation fails, by the"
    " previous macrostates again (never a preview left standing beside an error)."
    import fatebook.gpcca
    m = dg_explorer_fresh.macro
    m.views.show("macrostates")
    shown = []
    m.views.out["macrostates"].observe(lambda ch: shown.append(bytes(ch["new"])), "value")
    png0, g0 = bytes(m.views.out["macrostates"].value), m.estimator
    k, = _working_n_states(m, (5, 6, 8, 9, 2, 11, 12))
    m.memo.forget()                                                # k is a first visit for the widget
    def boom(*a, **kw): raise np.linalg.LinAlgError("the optimisation broke down")
    orig, m.memo._orig = m.memo._orig, boom
    assert m.set(n_states=k) is False
    assert m.message.startswith("LinAlgError: the optimisation broke down") and m.estimator is g0
    assert len(shown) == 2 and shown[0] != png0 and shown[-1] == png0     # preview, then the previous figure again
    m.memo._orig = orig
    shown.clear()
    assert m.set(n_states=k)
    assert len(shown) == 2 and m.calls["preview"] >= 2                     # preview, then the result
    m.views.invalidate(["macrostates"], render=False); m.views.render("macrostates")
    assert bytes(m.views.out["macrostates"].value) == shown[-1]           # the last image is the result's own figure


def test_background_optimisation_in_a_running_kernel(dg_explorer_fresh, monkeypatch):
    "In a live kernel (a running event loop) an n_states chosen in the browser returns at once with its preview; the"
    " controls stay live; a newer choice cancels the running optimisation; only the newest result is drawn."
    import asyncio, time as _time
    m = dg_explorer_fresh.macro
    ex = dg_explorer_fresh
    ex.show("macrostates"); m.views.show("macrostates")
    orig, started = m.memo._orig, []
    def slow(X, k, *a, **kw):                      # a slow optimisation (Python code, so it can be cancelled)
        started.append(k)
        for _ in range(150): _time.sleep(0.01)
        return orig(X, k, *a, **kw)
    m.memo._orig = slow
    forb = m.estimator.eigendecomposition["forbidden"]
    a, b, c = _working_n_states(m, (5, 6, 8, 9, 2, 11, 12, 13), 3)
    m.memo.forget()                                # first visits for the widget
    drawn = []                                     # what each macrostates figure shows
    prev_fig, states_fig = m._preview_figure, fw.states_figure
    monkeypatch.setattr(m, "_preview_figure", lambda g, k, p: drawn.append(("preview", k)) or prev_fig(g, k, p))
    monkeypatch.setattr(fw, "states_figure", lambda g, *a, **kw: drawn.append(("result", g.macrostates.cat.categories.size))
                        or states_fig(g, *a, **kw))
    def pick(k):                                   # what a browser message does: set_state under a property lock
        m.w["n_states"].set_state({"index": [v for _, v in m.w["n_states"].options].index(k)})

    async def scenario():
        t0 = _time.perf_counter()
        pick(a)
        assert _time.perf_counter() - t0 < 1.0 and m.pending[0]["n_states"] == a and m.params["n_states"] == 4
        assert "optimising the memberships of n_states=" in m.message
        await asyncio.sleep(0.3)
        assert started == [a]
        pick(b)                                    # the user moves on: a's optimisation is cancelled
        m.views.show("spectrum"); m.views.show("macrostates")   # other views are served meanwhile; the preview stays
        for _ in range(600):
            if m.pending is None and not m._bg.running: break
            await asyncio.sleep(0.02)

    asyncio.run(scenario())
    assert m.params["n_states"] == b and m.estimator.macrostates.cat.categories.size == b, m.message
    assert started == [a, b]                                     # b started at once after a was stopped
    assert m.memo.get(m.estimator.schur_vectors, a) is None      # a was cancelled, never finished
    # no stale figure: a's result is never drawn, and after b's preview only b's preview (the view switch) and result
    assert drawn[0] == ("preview", a) and ("result", a) not in drawn, drawn
    after_b = drawn[drawn.index(("preview", b)):]
    assert set(after_b[:-1]) == {("preview", b)} and after_b[-1] == ("result", b), drawn
    assert m.calls["background"] >= 2 and "n_states=%d" % b in m.message
    # a value set from code in the same running loop is computed at once (the plain-methods contract), and a change
    # made while a choice is being optimised builds on that choice
    async def from_code():
        m.w["n_states"].value = a
        assert m.params["n_states"] == a and m.pending is None
        pick(c)
        assert m.set(n_cells=15) and m.params["n_states"] == c and m.params["n_cells"] == 15
        await asyncio.sleep(0.05)
        assert not m._bg.running and m.pending is None
    asyncio.run(from_code())
    m.memo._orig = orig


def _renamed(a, fn):
    "A copy of `a` with the clusters renamed by `fn` (and their colours kept)."
    b = a.copy()
    b.obs["clusters"] = b.obs["clusters"].cat.rename_categories({c: fn(c) for c in b.obs["clusters"].cat.categories})
    return b


def test_cluster_names_with_commas(_dg_cache):
    "Names are data: a cluster called 'Granule, mature' is one state (not a merge of 'Granule' and 'mature'), in the"
    " lists, in merge text, in the printed code and in apply()."
    a = _renamed(_dg_cache(200), lambda c: c.replace(" ", ", "))
    ex = fw.explore(a, time_key="dpt_pseudotime", n_states=4, n_cells=20)
    assert ex.show("fates"), ex.fates.message                     # the default states (macrostates 'Granule, immature_1', ...)
    f = ex.fates
    assert all("," in str(n) for n in f.params["terminal_states"] if "Granule" in str(n))
    assert f.set(source="clusters", terminal_states=["Granule, mature", "Astrocytes", "Radial, Glia-like"],
                 initial_states=["nIPC"]), f.message
    assert list(f.estimator.fate_probabilities.names) == ["Astrocytes", "Granule, mature", "Radial, Glia-like"]
    assert f.set(merge="Astrocytes, Radial, Glia-like"), f.message     # read against the names: a merge of two states
    assert list(f.estimator.fate_probabilities.names) == ["Astrocytes, Radial, Glia-like", "Granule, mature"]
    assert f.set(merge="Granule, Astrocytes") is False and "Unknown state(s) ['Granule']" in f.message
    code = ex.code()
    assert "'Granule, mature'" in code and ".astype(str).isin(['Astrocytes', 'Radial, Glia-like'])" in code
    b = a.copy()
    _, g = ex.apply(b)
    assert list(g.fate_probabilities.names) == list(f.estimator.fate_probabilities.names)
    np.testing.assert_allclose(np.asarray(g.fate_probabilities), np.asarray(f.estimator.fate_probabilities), atol=1e-12)
    # macrostates named after such clusters, merged by tuple in the code
    assert f.set(source="macrostates")
    names = f.names()
    gran = next(n for n in names if "," in n)
    other = next(n for n in names if n != gran)
    pair = (gran, other)                                       # merged lineages keep the order typed
    assert f.set(terminal_states=[], merge=f"{gran}, {other}", initial_states=[]), f.message
    assert list(f.estimator.fate_probabilities.names) == [", ".join(pair)] and repr(pair) in ex.code()
    _, g = ex.apply(a.copy())
    np.testing.assert_allclose(np.asarray(g.fate_probabilities), np.asarray(f.estimator.fate_probabilities), atol=1e-12)


def test_state_keys_read_merges_against_the_names():
    names = ["A", "B", "A, B", "C, D", "C", "D"]
    assert fw.parse_groups("A, B; C", ["A", "B", "C"]) == [("A", "B"), ("C",)]
    assert fw.parse_groups("A, B", names) == [("A, B",)]              # the name itself wins over a merge of A and B
    assert fw.parse_groups("A, B, C", names) == [("A, B", "C")]
    assert fw.parse_groups("A, B, C, D", ["A, B", "C, D", "A", "B, C", "D"]) == [("A, B", "C, D")]   # fewest names
    with pytest.raises(ValueError, match="more than one way"):
        fw.parse_groups("A, B, C", ["A, B", "C", "A", "B, C"])
    with pytest.raises(KeyError, match=r"Unknown state\(s\) \['E'\]"):
        fw.parse_groups("A, E", names)
    assert fw.state_keys(["C", "A"], "", names) == [("A",), ("C",)]
    with pytest.raises(KeyError, match="Unknown state"): fw.state_keys(["Nope"], "", names)
    with pytest.raises(ValueError, match="more than one merge group"): fw.state_keys([], "A, C; C, D", ["A", "C", "D"])


def test_integer_cluster_names(_dg_cache):
    a = _dg_cache(200).copy()
    a.obs["clusters"] = pd.Categorical(a.obs["clusters"].cat.codes.to_numpy())   # 0, 1, 2, ... as integers
    assert a.obs["clusters"].cat.categories.dtype.kind == "i"
    ex = fw.explore(a, time_key="dpt_pseudotime", n_states=4, n_cells=20)
    assert ex.show("fates"), ex.fates.message
    f = ex.fates
    assert f.set(source="clusters", terminal_states=[0, 3, 4], merge="3, 4", initial_states=[9]), f.message
    assert list(f.estimator.fate_probabilities.names) == ["0", "3, 4"]
    _, g = ex.apply(a.copy())
    np.testing.assert_allclose(np.asarray(g.fate_probabilities), np.asarray(f.estimator.fate_probabilities), atol=1e-12)


def test_code_in_a_fresh_process_and_the_h5ad_round_trip(dg_explorer_fresh, _dg_cache, tmp_path):
    "code() run by a fresh Python on the file gives the widget's result; apply() writes the usual keys, twice is a no-op,"
    " and GPCCA.from_adata reads everything back after write/read_h5ad."
    import subprocess, sys, anndata as ad
    ex = dg_explorer_fresh
    f = ex.fates
    ex.tuner.set(softmax_scale=3.0, connectivity_weight=0.3)    # (first: the tuned kernel's macrostates have other names)
    assert ex.show("macrostates"), ex.macro.message
    names = f.names()
    assert f.set(terminal_states=names[1:], merge=", ".join(names[2:4]), initial_states=[]), f.message
    assert ex.show("fates"), ex.fates.message
    assert len(ex.estimator.fate_probabilities.names) == 2
    src = tmp_path / "in.h5ad"
    _dg_cache(200).write_h5ad(src)
    script = (f"import warnings; warnings.simplefilter('ignore')\nimport anndata, numpy as np\n"
              f"adata = anndata.read_h5ad({str(src)!r})\n{ex.code()}\n"
              f"np.save({str(tmp_path / 'fates.npy')!r}, np.asarray(g.fate_probabilities))\n"
              f"print(list(g.fate_probabilities.names))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == repr(list(map(str, ex.estimator.fate_probabilities.names)))
    np.testing.assert_allclose(np.load(tmp_path / "fates.npy"), np.asarray(ex.estimator.fate_probabilities), atol=1e-12)
    a = _dg_cache(200).copy()
    _, g = ex.apply(a)
    assert ex.written and f"adata.obsm['{Key.obsm.fate_probs()}']" in ex.written
    _, g2 = ex.apply(a)                                         # again: the same results, nothing new or changed
    assert ex.written == [], ex.written
    a.write_h5ad(tmp_path / "out.h5ad")
    b = ad.read_h5ad(tmp_path / "out.h5ad")
    r = GPCCA.from_adata(b)
    for attr in ("macrostates", "terminal_states"):
        assert list(getattr(r, attr).cat.categories) == list(getattr(g, attr).cat.categories)
        assert (getattr(r, attr).astype(str) == getattr(g, attr).astype(str)).all()
    assert r.initial_states is None
    assert list(r.fate_probabilities.names) == list(g.fate_probabilities.names)
    np.testing.assert_allclose(np.asarray(r.fate_probabilities), np.asarray(g.fate_probabilities), atol=0)
    np.testing.assert_allclose(r.absorption_times.to_numpy(), g.absorption_times.to_numpy(), atol=0)
    pd.testing.assert_frame_equal(r.lineage_drivers, g.lineage_drivers, check_names=False)
    np.testing.assert_allclose(r.coarse_T.to_numpy(), g.coarse_T.to_numpy(), atol=0)


def test_one_lineage_code_still_applies(dg_explorer_fresh, _dg_cache):
    "With one lineage drivers cannot be computed: the widget says so, and code() leaves that step out (commented)."
    ex = dg_explorer_fresh
    f = ex.fates
    assert f.set(terminal_states=f.names()[:1], initial_states=[]), f.message
    f.views.show("drivers")                                    # the view and the status line say why
    assert f.status.kind == "error" and "fate probabilities of the only lineage" in f.message
    assert "not drawn. The fate probabilities of the only lineage" in f.views.out["drivers"].value
    code = ex.code()
    assert "# g.compute_lineage_drivers()  # not run: The fate probabilities of the only lineage" in code
    _, g = ex.apply(_dg_cache(200).copy())
    assert g.fate_probabilities.shape[1] == 1 and g.lineage_drivers is None and g.absorption_times is not None


def test_data_without_an_embedding_clusters_or_velocity(_dg_cache):
    base = _dg_cache(200)
    a = base.copy(); del a.obsm["X_umap"]                      # no UMAP: the first other embedding, named in the figures
    ex = fw.explore(a, time_key="dpt_pseudotime", n_states=4, n_cells=20)
    assert ex.tuner.basis == "pca" and ex.show("fates"), ex.fates.message
    a.obsm.clear()
    with pytest.raises(Exception, match=r"No 2-D embedding.*scanpy.tl.umap"):
        fw.explore(a)
    with pytest.raises(Exception, match=r"X_tsne.*pass basis= one of \['diffmap', 'pca', 'umap'\]"):
        fw.explore(base.copy(), basis="tsne")
    b = base.copy(); del b.obs["clusters"]                     # no clusters: macrostates numbered, the cluster views say why
    ex = fw.explore(b, time_key="dpt_pseudotime", n_states=4, n_cells=20)
    assert ex.show("fates"), ex.fates.message
    assert list(ex.macro.estimator.macrostates.cat.categories) == ["0", "1", "2", "3"]
    assert ex.fates.views.render("by cluster") is False and "needs a categorical `cluster_key`" in ex.fates.message
    assert ex.fates.set(source="clusters") is False and "needs a categorical `cluster_key`" in ex.fates.message
    assert "cluster_key" not in ex.code()
    c = base.copy()                                            # a pseudotime only, tuned backward
    for layer in ("velocity", "Ms"): del c.layers[layer]
    ex = fw.explore(c, time_key="dpt_pseudotime", backward=True, n_states=3, n_cells=20)
    assert ex.tuner.params["pseudotime_weight"] == 0.8 and ex.kernel.backward is True
    assert ex.show("fates"), ex.fates.message
    code = ex.code()
    assert "PseudotimeKernel(adata, backward=True, time_key='dpt_pseudotime')" in code and "VelocityKernel" not in code
    _, g = ex.apply(c.copy())
    np.testing.assert_allclose(np.asarray(g.fate_probabilities), np.asarray(ex.estimator.fate_probabilities), atol=1e-12)
    assert Key.obsm.fate_probs(True) in ex.work.obsm


def test_controls_are_labelled_with_the_parameter_names(dg_explorer_fresh):
    ex = dg_explorer_fresh
    for pane in (ex.tuner, ex.macro, ex.fates):
        named = [k for k in pane.w if k in pane.params and k != "source"]   # 'source' (fatebook's own) reads "states from"
        assert named, pane
        for k in named: assert pane.w[k].description == k, (k, pane.w[k].description)
    assert {"velocity_weight", "softmax_scale", "backward"} <= set(ex.tuner.w) and "n_states" in ex.macro.w
    assert ex.macro.w["cluster_key"].options == (None, "clusters", "age(days)", "clusters_enlarged")  # not fatebook's own


def test_every_control_at_its_extremes(dg_explorer_fresh):
    "Each slider at its minimum and maximum and each list entry: a result or a message (never an exception), and after a"
    " message the previous result is still there and the control shows it."
    import ipywidgets as W
    ex = dg_explorer_fresh
    for pane in (ex.tuner, ex.macro, ex.fates):
        for name, w in pane.w.items():
            if isinstance(w, W.Button) or w.disabled: continue
            if isinstance(w, (W.FloatSlider, W.IntSlider, W.FloatLogSlider)):
                values = [w.min, w.max] if not isinstance(w, W.FloatLogSlider) else [w.base ** w.min, w.base ** w.max]
            elif isinstance(w, (W.Dropdown, W.ToggleButtons)):
                values = [v for _, v in w.options] if w.options and isinstance(w.options[0], tuple) else list(w.options)
                values = values if len(values) <= 4 else [values[0], values[-1]]     # the first and the last entry
            elif isinstance(w, W.SelectMultiple): values = [tuple(v for _, v in w.options), ()]
            elif isinstance(w, W.Checkbox): values = [not w.value]
            elif isinstance(w, W.Text): values = ["; ;"]
            else: continue
            start = w.value
            for v in values + [start]:                # each extreme, then back to where it was
                w.value = v
                assert "Traceback" not in pane.message, (name, v, pane.message)
                if pane.status.kind == "error" and name in pane.params:
                    assert "previous result is kept" in pane.message, (name, v, pane.message)
                    assert w.value == pane.params[name] or name.endswith("_states"), (name, v, w.value)   # shows the kept value
        if pane is ex.tuner: ex.tuner.set(velocity_weight=0.8, connectivity_weight=0.2, pseudotime_weight=0.0)
        if pane is ex.macro:
            assert ex.show("macrostates"); ex.macro.set(n_components=20, n_states=4, n_cells=20)
        if pane is ex.tuner: assert ex.show("macrostates")
    assert ex.show("fates"), ex.fates.message
    assert ex.show("result") and "compute_fate_probabilities" in ex.code_html.value


def test_a_bug_in_a_callback_is_a_message_not_a_traceback(dg_explorer_fresh, monkeypatch):
    "Whatever escapes the steps' own error handling (here: a planted bug) is shown in the status line; the control"
    " and the result stay usable."
    ex = dg_explorer_fresh
    m = ex.macro
    def bug(self, *a, **k): raise AttributeError("'NoneType' object has no attribute 'schur_vectors'")
    monkeypatch.setattr(fw.MacrostateExplorer, "_update", bug)
    m.w["n_cells"].value = 15                                      # no exception reaches the caller (the browser)
    assert m.status.kind == "error" and m.message.startswith("Unexpected error: AttributeError: 'NoneType'")
    assert "last_error" in m.message and isinstance(m.last_error, AttributeError)
    monkeypatch.setattr(fw.Views, "render_visible", bug)
    ex.fates.views.tab.selected_index = 1
    assert ex.fates.message.startswith("Unexpected error: AttributeError")
    monkeypatch.undo()
    assert m.set(n_cells=20) and ex.show("fates")


def _pixels(png: bytes) -> np.ndarray:
    import io, matplotlib.image as mpimg
    return mpimg.imread(io.BytesIO(bytes(png)), format="png")


def test_figures_updated_in_place_equal_fresh_ones(dg_explorer_fresh):
    "The projection and the fate maps are redrawn by updating the pane's own figure: the pixels equal a new figure's."
    ex = dg_explorer_fresh
    t, f = ex.tuner, ex.fates
    for w in (0.5, 0.3):
        t.set(connectivity_weight=w)
        fresh = fw.fig_to_png(fw.projection_figure(t.kernel, basis=t.basis, color=t.cluster_key, dpi=t.dpi))
        np.testing.assert_array_equal(_pixels(t.views.out["projection"].value), _pixels(fresh))
    names = f.names()
    for sel in (names[:2], names[1:3], names[:2], names[:3]):
        assert f.set(terminal_states=sel, initial_states=[]), f.message
        fresh = fw.fig_to_png(fw.fates_figure(f.estimator, dpi=f.dpi))
        np.testing.assert_array_equal(_pixels(f.views.out["fate maps"].value), _pixels(fresh))
    assert len(f._maps) == 2                                 # one figure per layout (two and three lineages)
