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
    assert f.set(terminal_states=["Astrocytes", "Ductal"]) is False
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
