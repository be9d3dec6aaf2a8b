"""BaseEstimator (fatebook.estimators): inputs, states, fates, drivers, AnnData I/O, errors, nothing half-written."""
from __future__ import annotations
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
import anndata as ad
import pytest

from fatebook.core import Key
from fatebook.estimators import BaseEstimator, states_from_input, name_states, default_colors


class ToyKernel:
    "The kernel contract: transition_matrix, adata, backward."
    def __init__(self, adata, T, backward=False):
        self.adata, self.transition_matrix, self.backward = adata, sp.csr_matrix(T), backward
    def __str__(self): return f"ToyKernel[n={self.adata.n_obs}]"


def ruin(N=8, extra_closed=True):
    "Gambler's ruin 0..N (0 and N absorbing), plus one self-looping cell that reaches nothing."
    n = N + 1 + int(extra_closed)
    T = np.zeros((n, n)); T[0, 0] = T[N, N] = 1
    for i in range(1, N): T[i, i - 1] = T[i, i + 1] = 0.5
    if extra_closed: T[N + 1, N + 1] = 1
    rng = np.random.default_rng(0)
    X = np.c_[np.arange(n, dtype=float), rng.random(n), np.r_[np.arange(N + 1)[::-1], 0.]]
    a = ad.AnnData(X, obs=pd.DataFrame({"clusters": pd.Categorical(["L"] + ["mid"] * (N - 1) + ["R"] + ["x"] * extra_closed)},
                                       index=[f"c{i}" for i in range(n)]),
                   var=pd.DataFrame(index=["pos", "noise", "rev"]))
    a.layers["counts"] = X * 2
    return a, T


@pytest.fixture
def est():
    a, T = ruin()
    return BaseEstimator(ToyKernel(a, T))


def test_gamblers_ruin_fates_and_times(est):
    N = 8
    est.set_terminal_states({"L": ["c0"], "R": [N]})
    est.compute_fate_probabilities()
    B = np.asarray(est.fate_probabilities)
    np.testing.assert_allclose(B[:N + 1, 1], np.arange(N + 1) / N, atol=1e-10)
    np.testing.assert_allclose(B[:N + 1].sum(1), 1, atol=1e-12)
    assert np.isnan(B[N + 1]).all()                                   # unreachable: NaN, and counted
    assert est.params["fate_probabilities"]["n_unreachable"] == 1
    est.compute_absorption_times(keys=["L, R"])
    i = np.arange(1, N)
    np.testing.assert_allclose(est.absorption_times.iloc[1:N, 0].to_numpy(), i * (N - i), rtol=1e-8)


def test_unreachable_raise_keeps_previous(est):
    est.set_terminal_states({"L": [0], "R": [8]}).compute_fate_probabilities()
    before = np.asarray(est.fate_probabilities).copy()
    with pytest.raises(ValueError, match="cannot reach any terminal state"):
        est.compute_fate_probabilities(unreachable="raise")
    np.testing.assert_array_equal(np.asarray(est.fate_probabilities), before)   # nothing half-written
    np.testing.assert_array_equal(est.adata.obsm[Key.obsm.fate_probs()], before)


def test_states_inputs(est):
    a = est.adata
    s, cols = states_from_input(a, {"clusters": ["L", "R"]})
    assert list(s.cat.categories) == ["L", "R"] and s.notna().sum() == 2
    mask = np.zeros(a.n_obs, bool); mask[[1, 2]] = True
    s, _ = states_from_input(a, {"m": mask})
    assert s.notna().sum() == 2 and s.iloc[1] == "m"
    ser = pd.Series(pd.Categorical(["A", None, None, None, None, None, None, None, "B", None]), index=a.obs_names)
    est.set_terminal_states(ser)
    assert list(est.terminal_states.cat.categories) == ["A", "B"]
    assert est.terminal_states_probabilities.sum() == 2
    with pytest.raises(ValueError, match="length 3"): states_from_input(a, {"m": np.ones(3, bool)})
    with pytest.raises(IndexError, match="positions"): states_from_input(a, {"m": [99]})
    with pytest.raises(TypeError, match="no macrostates"): est.set_terminal_states(["A"])
    with pytest.raises(TypeError, match="non-empty dict"): est.set_terminal_states({})


def test_merge_keys_colors(est):
    est.set_terminal_states({"L": [0], "R": [8]}, colors=["#000000", "#ffffff"])
    est.compute_fate_probabilities(keys=["L, R"])
    assert est.fate_probabilities.names == ["L, R"]
    assert est.fate_probabilities.colors == ["#808080"]
    with pytest.raises(KeyError, match="valid names"): est.compute_fate_probabilities(keys=["Q"])
    with pytest.raises(ValueError, match="more than one key"): est.compute_fate_probabilities(keys=["L", "L, R"])


def test_drivers_options(est):
    est.set_terminal_states({"L": [0], "R": [8]}).compute_fate_probabilities()
    df = est.compute_lineage_drivers()
    assert df.loc["pos", "R_corr"] == pytest.approx(1.0) and df.loc["rev", "L_corr"] == pytest.approx(1.0)
    assert list(df.columns[:5]) == ["L_corr", "L_pval", "L_qval", "L_ci_low", "L_ci_high"]
    v = est.adata.varm[Key.varm.drivers()]
    assert isinstance(v, np.ndarray) and v.shape == (3, 10)
    d2 = est.compute_lineage_drivers(layer="counts", lineages=["R"])
    assert list(d2.columns[:1]) == ["R_corr"] and d2.loc["pos", "R_corr"] == pytest.approx(1.0)
    d3 = est.compute_lineage_drivers(cluster_key="clusters", clusters=["mid"])
    assert est.params["lineage_drivers"]["n_cells"] == 7
    mid = np.flatnonzero(est.adata.obs["clusters"].to_numpy() == "mid")
    d3b = est.compute_lineage_drivers(cells=mid)                       # lineage_drivers' cells=, passed through
    pd.testing.assert_frame_equal(d3b, d3)
    est.compute_lineage_drivers(cluster_key="clusters", clusters=["mid"], cells=mid[:5])   # both apply
    assert est.params["lineage_drivers"]["n_cells"] == 5
    assert est.compute_lineage_drivers(return_drivers=False) is None
    d4 = est.compute_lineage_drivers(use_raw=True)                     # no .raw: warns and uses X
    pd.testing.assert_frame_equal(d4, df)
    est.adata.raw = est.adata.copy()                                    # drivers on .raw are not written to varm: an
    est.compute_lineage_drivers(use_raw=True, method="spearman")      # earlier table there is removed (it stood for them)
    assert Key.varm.drivers() not in est.adata.varm and "lineage_drivers" not in est.adata.uns[Key.uns.estimator(False)]["params"]
    del est.adata.raw
    with pytest.raises(KeyError, match="layer='nope'"): est.compute_lineage_drivers(layer="nope")
    with pytest.raises(KeyError, match="cluster_key='nope'"): est.compute_lineage_drivers(cluster_key="nope", clusters=["x"])


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_drivers_of_selected_clusters_on_a_backed_anndata(kind, tmp_path):
    "compute_lineage_drivers (all cells, or clusters=...) on an AnnData opened with backed='r+': X is read from the file by windows of rows."
    from fatebook.kernels import PrecomputedKernel
    rng = np.random.default_rng(0); n, g = 80, 6
    T = sp.diags([np.r_[0.5 * np.ones(n - 2), 0], np.r_[1, np.zeros(n - 2), 1], np.r_[0, 0.5 * np.ones(n - 2)]], [-1, 0, 1]).tocsr()
    X = (np.outer(np.arange(n) / n, rng.random(g)) + .2 * rng.random((n, g))).astype(np.float32)
    obs = pd.DataFrame({"clusters": pd.Categorical(np.repeat(list("ab"), n // 2))}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=X if kind == "dense" else sp.csr_matrix(X), obs=obs).write_h5ad(tmp_path / "b.h5ad")
    b = ad.read_h5ad(tmp_path / "b.h5ad", backed="r+")
    try:
        e = BaseEstimator(PrecomputedKernel(b, matrix=T))
        e.set_terminal_states({"L": ["c0"], "R": [f"c{n - 1}"]}).compute_fate_probabilities()
        B = np.asarray(e.fate_probabilities)
        for clusters, m in ((["a"], 40), (None, n)):
            df = e.compute_lineage_drivers(cluster_key="clusters", clusters=clusters)
            want = [np.corrcoef(X[:m, j], B[:m, 0])[0, 1] for j in range(g)]
            np.testing.assert_allclose(df.loc[[str(v) for v in b.var_names], "L_corr"], want, rtol=1e-6)
            assert e.params["lineage_drivers"]["n_cells"] == m
        sp_ = e.compute_lineage_drivers(method="spearman")   # (backed sparse: the rows in memory; dense: by blocks of genes)
        want = [stats.spearmanr(X[:, j], B[:, 0]).statistic for j in range(g)]
        np.testing.assert_allclose(sp_.loc[[str(v) for v in b.var_names], "L_corr"], want, rtol=1e-6)
        # a few genes (trends, driver plots), in any order of genes and cells: h5py takes increasing indices only
        from fatebook.trends import expression
        from fatebook.plots import _expression
        np.testing.assert_array_equal(expression(b, ["3", "1"], rows=np.array([7, 2, 7])), X[[7, 2, 7]][:, [3, 1]])
        np.testing.assert_array_equal(_expression(b, ["5", "0"]), X[:, [5, 0]])
    finally: b.file.close()

def test_h5ad_roundtrip(est, tmp_path):
    est.set_terminal_states({"L": [0], "R": [8]}).set_initial_states({"S": [4]})
    est.compute_fate_probabilities().compute_absorption_times(calculate_variance=True)
    est.compute_lineage_drivers()
    p = tmp_path / "e.h5ad"
    est.adata.write_h5ad(p)
    e2 = BaseEstimator.from_adata(ad.read_h5ad(p))
    assert repr(e2) == repr(est)
    assert e2.params == est.params
    assert e2.fate_probabilities.names == ["L", "R"] and e2.fate_probabilities.colors == est.fate_probabilities.colors
    np.testing.assert_array_equal(np.asarray(e2.fate_probabilities), np.asarray(est.fate_probabilities))
    pd.testing.assert_frame_equal(e2.absorption_times, est.absorption_times)
    pd.testing.assert_frame_equal(e2.lineage_drivers, est.lineage_drivers, check_names=False)
    assert e2.initial_states.astype(str).tolist() == est.initial_states.astype(str).tolist()
    assert e2._state_colors == est._state_colors


def test_construction_errors():
    a, T = ruin()
    bad = T.copy(); bad[2, 2] = 0.1
    with pytest.raises(ValueError, match="not row-stochastic"): BaseEstimator(ToyKernel(a.copy(), bad))
    neg = T.copy(); neg[2, 1] = 1.5; neg[2, 3] = -0.5
    with pytest.raises(ValueError, match="negative"): BaseEstimator(ToyKernel(a.copy(), neg))
    with pytest.raises(ValueError, match="does not match the kernel"): BaseEstimator(ToyKernel(a.copy(), T), backward=True)
    with pytest.raises(KeyError, match="fb_T_fwd"): BaseEstimator(a.copy())
    a2 = a.copy(); a2.obsp[Key.obsp.T(True)] = sp.csr_matrix(T)
    with pytest.raises(KeyError, match="pass backward=True"): BaseEstimator(a2)
    e = BaseEstimator(a2, backward=True)
    assert e.backward and e.transition_matrix.shape == (10, 10)
    with pytest.raises(TypeError, match="kernel or an AnnData"): BaseEstimator(T)
    with pytest.raises(ValueError, match="view"): BaseEstimator(a2[:5], backward=True)
    with pytest.raises(ValueError, match="cells"): BaseEstimator(ToyKernel(a[:5].copy(), T))
    e = BaseEstimator(ToyKernel(a.copy(), T))
    with pytest.raises(RuntimeError, match="No terminal states"): e.compute_fate_probabilities()
    with pytest.raises(RuntimeError, match="No terminal states"): e.compute_absorption_times()
    with pytest.raises(RuntimeError, match="No fate probabilities"): e.compute_lineage_drivers()


def test_overlap_and_clearing(est):
    est.set_terminal_states({"L": [0], "R": [8]}).compute_fate_probabilities()
    with pytest.raises(ValueError, match="both initial and terminal"): est.set_initial_states({"S": [0]})
    assert est.initial_states is None
    est.set_initial_states({"S": [0]}, allow_overlap=True)
    est.set_terminal_states({"L": [1], "R": [8]}, allow_overlap=True)      # new terminal states clear fates
    assert est.fate_probabilities is None and Key.obsm.fate_probs() not in est.adata.obsm
    with pytest.raises(ValueError, match="more than one state"): est.set_terminal_states({"L": [1], "R": [1]})


def test_backward_keys():
    a, T = ruin()
    e = BaseEstimator(ToyKernel(a, T, backward=True))
    e.set_terminal_states({"L": [0]})
    assert Key.obs.term_states(True) in a.obs and Key.obs.term_states(False) not in a.obs
    assert Key.obsp.T(True) in a.obsp
    e2 = BaseEstimator(a, backward=True)
    assert repr(e2).startswith("BaseEstimator[kernel=adata.obsp['fb_T_bwd'] (n=10)")   # built from the AnnData directly


def test_pep562_and_plots():
    from fatebook.estimators import GPCCA, CFLARE
    import fatebook.estimators as E
    assert issubclass(GPCCA, BaseEstimator) and issubclass(CFLARE, BaseEstimator)
    with pytest.raises(AttributeError): E.NotAThing
    assert BaseEstimator.plot_absorption_probabilities is BaseEstimator.plot_fate_probabilities
    for name in ("plot_spectrum", "plot_schur", "plot_macrostates", "plot_terminal_states", "plot_fate_probabilities",
                 "plot_coarse_T", "plot_lineage_drivers"):
        assert callable(getattr(BaseEstimator, name))


def test_plot_delegation(monkeypatch):
    import fatebook.plots as P
    a, T = ruin()
    e = BaseEstimator(ToyKernel(a, T))
    seen = {}
    monkeypatch.setattr(P, "plot_coarse_T", lambda est, *args, **kw: seen.update(est=est, args=args, kw=kw) or "fig", raising=False)
    assert e.plot_coarse_T(1, order=None) == "fig" and seen == dict(est=e, args=(1,), kw=dict(order=None))
    monkeypatch.delattr(P, "plot_schur_matrix", raising=False)
    with pytest.raises(NotImplementedError, match="plot_schur_matrix"): e.plot_schur_matrix()


def test_name_states_palette():
    names, cols = name_states(np.r_[np.zeros(5, int), np.ones(5, int)], 2)
    assert names == ["0", "1"] and cols == default_colors(2)
    assert len(set(default_colors(35))) == 35


def test_priming_and_rename(est):
    est.set_terminal_states({"L": [0], "R": [8]}).compute_fate_probabilities()
    pr = est.compute_lineage_priming(method="entropy")
    assert pr.iloc[0] == pytest.approx(1) and pr.iloc[4] == pytest.approx(0) and np.isnan(pr.iloc[9])
    np.testing.assert_array_equal(est.adata.obs[Key.obs.priming()].to_numpy(), pr.to_numpy())
    pr2 = est.compute_lineage_priming(early_cells={"clusters": ["mid"]})
    assert pr2.iloc[4] == pytest.approx(0) and pr2.iloc[8] == pytest.approx(1)
    with pytest.raises(ValueError, match="method='x'"): est.compute_lineage_priming(method="x")
    est.rename_terminal_states({"L": "left"})
    assert est.fate_probabilities.names == ["left", "R"]
    assert list(est.adata.obs[Key.obs.term_states()].cat.categories) == ["left", "R"]
    with pytest.raises(ValueError, match="the same name"): est.rename_terminal_states({"left": "R"})


@pytest.mark.parametrize("case, warns", [("absorbing", True), ("mixing", False)])
def test_stationary_split_between_nearly_closed_sets_is_reported(caplog, case, warns):
    """Issue 13 (degenerate structure is reported): three nearly absorbing ends (transitions out of them weighted by
    1e-15): the split of pi between the ends solves pi T = pi to rounding whatever it is, and the estimator's pi
    (coarse stationary distribution, initial states) says so. A well mixing chain (1 - lambda_2 ~ 0.1): nothing said."""
    import logging
    from fatebook.linalg import slow_chain, knn_chain
    from fatebook.kernels import PrecomputedKernel
    from fatebook.estimators import GPCCA, _fast_stationary
    T, t, lab = slow_chain(800, "absorbing", eps=1e-15, seed=0) if case == "absorbing" else knn_chain(1500, bias=1.0, seed=0)
    a = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical(lab.astype(str))}, index=[f"c{i}" for i in range(T.shape[0])]))
    g = GPCCA(PrecomputedKernel(matrix=T, adata=a)).compute_schur(n_components=6)
    assert len(g._recurrent_classes()[0]) == 1 and _fast_stationary(T) is not None   # the ARPACK shortcut computes pi
    with caplog.at_level(logging.WARNING, logger="fatebook"):
        g.compute_macrostates(n_states=2, cluster_key="clusters")
        pi = g._stationary_distribution()                       # (computed above when the coarse chain cannot give it)
    assert ("nearly reducible" in caplog.text) == warns, caplog.text
    assert abs(pi.sum() - 1) < 1e-12 and np.abs(T.T @ pi - pi).sum() < 1e-10   # a solution either way


def test_coarse_stationary_distribution_is_computed_on_first_use(monkeypatch, tmp_path):
    """Issue 14 (only the work a result needs): when the coarse chain cannot give chi' pi (here a nearly reducible
    chain), pi of T — an ARPACK run on T', 2.7 of the 3.4 s of `compute_macrostates` at 100,000 cells — is computed on
    first use of `coarse_stationary_distribution`, once. The value is chi' pi; reading it changes neither the AnnData
    nor the eigendecomposition; an estimator read back from h5ad computes the same."""
    import copy
    import fatebook.estimators as E
    from fatebook.linalg import slow_chain
    from fatebook.kernels import PrecomputedKernel
    from fatebook.estimators import GPCCA
    from helpers import assert_value_equal
    T, t, lab = slow_chain(800, "absorbing", eps=1e-15, seed=0)
    a = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical(lab.astype(str))}, index=[f"c{i}" for i in range(T.shape[0])]))
    g = GPCCA(PrecomputedKernel(matrix=T, adata=a)).compute_schur(n_components=6)
    calls, orig = [], E._fast_stationary
    monkeypatch.setattr(E, "_fast_stationary", lambda M: calls.append(1) or orig(M))
    g.compute_macrostates(n_states=2, cluster_key="clusters")
    assert calls == [] and "stat_dist" not in a.uns[Key.uns.coarse()]
    uns0, ed0 = copy.deepcopy(dict(a.uns)), copy.deepcopy(g.eigendecomposition)
    s = g.coarse_stationary_distribution
    assert len(calls) == 1 and list(s.index) == list(g.coarse_T.index)
    assert g.coarse_stationary_distribution is s and len(calls) == 1                 # kept, not recomputed
    pi = orig(T)
    np.testing.assert_allclose(s.to_numpy(), np.asarray(g.macrostates_memberships).T @ pi, atol=1e-12)
    assert_value_equal(dict(a.uns), uns0, "uns"); assert_value_equal(g.eigendecomposition, ed0, "eigendecomposition")
    g.predict_initial_states()
    assert len(calls) == 1
    g.compute_macrostates(n_states=3, cluster_key="clusters")             # new macrostates: pi itself is not recomputed
    s3 = g.coarse_stationary_distribution
    assert len(calls) == 1 and len(s3) == 3
    np.testing.assert_allclose(s3.to_numpy(), np.asarray(g.macrostates_memberships).T @ pi, atol=1e-12)
    g.compute_macrostates(n_states=2, cluster_key="clusters")
    pd.testing.assert_series_equal(g.coarse_stationary_distribution, s); assert len(calls) == 1
    p = tmp_path / "g.h5ad"; a.write_h5ad(p)
    g2 = GPCCA.from_adata(ad.read_h5ad(p))
    pd.testing.assert_series_equal(g2.coarse_stationary_distribution, s)
    assert len(calls) == 2; calls.clear()
    # a chain whose coarse T has a simple eigenvalue 1 gives it at once, and writes it
    from fatebook.linalg import knn_chain
    T3, t3, lab3 = knn_chain(1500, bias=1.0, seed=0)
    a3 = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical(lab3.astype(str))}, index=[f"c{i}" for i in range(T3.shape[0])]))
    g3 = GPCCA(PrecomputedKernel(matrix=T3, adata=a3)).compute_schur(n_components=6).compute_macrostates(n_states=2, cluster_key="clusters")
    assert "stat_dist" in a3.uns[Key.uns.coarse()] and calls == []
    np.testing.assert_allclose(g3.coarse_stationary_distribution.to_numpy(), a3.uns[Key.uns.coarse()]["stat_dist"])


def test_an_interrupted_first_read_of_the_coarse_stationary_distribution_stays_pending(monkeypatch):
    "Ctrl-C during pi (16 s at 1,000,000 cells) must not leave the coarse stationary distribution None for good."
    import fatebook.estimators as E
    from fatebook.linalg import slow_chain
    from fatebook.kernels import PrecomputedKernel
    from fatebook.estimators import GPCCA
    T, t, lab = slow_chain(800, "absorbing", eps=1e-15, seed=0)
    a = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical(lab.astype(str))}, index=[f"c{i}" for i in range(T.shape[0])]))
    g = GPCCA(PrecomputedKernel(matrix=T, adata=a)).compute_schur(n_components=6).compute_macrostates(n_states=2, cluster_key="clusters")
    orig = E._fast_stationary
    def interrupted(M): raise KeyboardInterrupt
    monkeypatch.setattr(E, "_fast_stationary", interrupted)
    with pytest.raises(KeyboardInterrupt): g.coarse_stationary_distribution
    monkeypatch.setattr(E, "_fast_stationary", orig)
    s = g.coarse_stationary_distribution
    assert s is not None and abs(s.sum() - 1) < 1e-12
    g.predict_initial_states()
    assert g.initial_states is not None


def test_a_float32_transition_matrix_in_obsp_works_end_to_end(dentate_gyrus_path):
    """Issue 13 (numeric types): `GPCCA(adata)` accepted a float32 `obsp` matrix (rows off by ~1e-8) but kept it
    un-normalised in float64, so `compute_schur` (float64 tolerance) rejected it. The estimator now takes it through
    the kernels' one rule: checked at float32 precision, renormalised in float64; the AnnData's matrix is untouched."""
    import warnings
    from fatebook.velocity import VelocityKernel
    from fatebook.kernels import ConnectivityKernel
    from fatebook.estimators import GPCCA
    a = ad.read_h5ad(dentate_gyrus_path(200))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = 0.8 * VelocityKernel(a).compute_transition_matrix() + 0.2 * ConnectivityKernel(a).compute_transition_matrix()
    T32 = k.transition_matrix.astype(np.float32); a.obsp["fb_T_fwd"] = T32.copy()
    assert np.abs(np.asarray(T32.sum(1), dtype=float).ravel() - 1).max() > 1e-9          # off in float64 terms
    g = GPCCA(a)
    assert g._T.dtype == np.float64 and np.abs(np.asarray(g._T.sum(1)).ravel() - 1).max() < 1e-14
    g.compute_schur(n_components=10).compute_macrostates(n_states=4, cluster_key="clusters")
    g.set_terminal_states_from_macrostates().compute_fate_probabilities()
    np.testing.assert_allclose(np.asarray(g.fate_probabilities).sum(1), 1, atol=1e-12)
    assert a.obsp["fb_T_fwd"].dtype == np.float32 and (a.obsp["fb_T_fwd"] != T32).nnz == 0


def test_fates_with_keys_leaving_out_nearly_closed_terminal_states(caplog):
    """A terminal state left out of `keys` is transient in the solve; a (nearly) closed one makes the system so badly
    conditioned that a small residual hides a large error (the 100,000-cell pipeline with keys=['root_0', 'C_4'] of 4
    terminal macrostates: 'negative entries -0.34' and the advice solver='direct', an LU of 100,000 cells). The fates'
    certified error (fatebook.fate: the mean number of steps to absorption times the residual) catches it: GMRES raises
    (negative entries) with the slow cells and the keys that keep the left-out states as a lineage; 'auto' (sparse LU
    at this size) is not certified either and warns the same; with those keys the fates are certified."""
    import logging
    from fatebook.linalg import slow_chain
    from fatebook.kernels import PrecomputedKernel
    from fatebook.estimators import GPCCA
    T, t, lab = slow_chain(3000, "blocks", n_blocks=6, eps=1e-9, seed=0)   # 6 blobs in a row, joined by 1e-9
    a = ad.AnnData(obs=pd.DataFrame({"clusters": pd.Categorical([f"blob{x}" for x in lab])},
                                    index=[f"c{i}" for i in range(T.shape[0])]))
    g = GPCCA(PrecomputedKernel(matrix=T, adata=a))
    g.set_terminal_states({f"blob{j}": np.flatnonzero(lab == j)[:30] for j in range(6)})
    keep = "keys=['blob0', 'blob5', 'blob1, blob2, blob3, blob4']"
    from fatebook.fate import FatesNotCertified
    with pytest.raises(FatesNotCertified, match=r"certified only.*blob1, blob2, blob3, blob4 are left out of `keys`") as e:
        g.compute_fate_probabilities(keys=["blob0", "blob5"], solver="gmres")
    assert keep in str(e.value) and g.fate_probabilities is None                  # nothing written
    with caplog.at_level(logging.WARNING, logger="fatebook"):
        g.compute_fate_probabilities(keys=["blob0", "blob5"])
    assert "certified only" in caplog.text and keep in caplog.text
    assert g._fate_report["solver"] == "direct" and g._fate_report["error_bound"] > 1e-3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fatebook"):
        g.compute_fate_probabilities(keys=["blob0", "blob5", "blob1, blob2, blob3, blob4"])
    assert "certified" not in caplog.text and g._fate_report["error_bound"] < 1e-5


def test_gpcca_then_cflare_keeps_each_estimators_own_parameters(tmp_path):
    """GPCCA and then CFLARE on one AnnData: the shared results (terminal states, fates) are CFLARE's, but GPCCA's
    macrostates stay, and GPCCA.from_adata reads them with their parameters (it read CFLARE's record only, so
    re-setting terminal states from the macrostates took 30 top cells instead of the user's 20). CFLARE.from_adata
    does not take GPCCA's own parameters. Through an h5ad file too."""
    import logging
    from helpers import capture_log
    from fatebook.datasets import read_h5ad, write_h5ad
    from fatebook.estimators import GPCCA, CFLARE
    from fatebook.gpcca import block_chain
    sizes = [50, 60, 70, 80]
    L = np.zeros((4, 4)); L[0, 1] = 0.08; L[1, 2] = L[1, 3] = 0.03; L[2, 0] = L[3, 0] = 0.0005
    a = ad.AnnData(np.zeros((sum(sizes), 1)), obs=pd.DataFrame(
        {"clusters": pd.Categorical(np.repeat(["prog", "mid", "A", "B"], sizes))}, index=[f"c{i}" for i in range(sum(sizes))]))
    a.obsp[Key.obsp.T()] = block_chain(sizes, leak=L, seed=0)
    g = GPCCA(a); g.compute_schur(n_components=6); g.compute_macrostates(n_states=4, cluster_key="clusters", n_cells=20)
    g.set_terminal_states_from_macrostates(["A", "B"]); g.compute_fate_probabilities()
    c = CFLARE(a); c.compute_eigendecomposition(k=6); c.compute_terminal_states(use=3); c.compute_fate_probabilities()
    p = tmp_path / "both.h5ad"; write_h5ad(a, p)
    for b in (a, read_h5ad(p)):
        with capture_log(logging.WARNING) as log:
            g2 = GPCCA.from_adata(b)
        assert any("holds results of a CFLARE estimator (terminal_states, eigendecomposition, fate_probabilities)" in m
                   for m in log), log
        assert g2.params["macrostates"] == g.params["macrostates"] and g2.params["schur"] == g.params["schur"]
        assert g2.params["terminal_states"] == c.params["terminal_states"]              # the states in the AnnData are CFLARE's
        assert g2.params["fate_probabilities"] == c.params["fate_probabilities"]
        assert list(g2.terminal_states.cat.categories) == list(c.terminal_states.cat.categories)
        g2.set_terminal_states_from_macrostates(["A", "B"])
        assert g2.terminal_states.value_counts().to_dict() == {"A": 20, "B": 20}       # the user's n_cells, not 30
    g3 = GPCCA.from_adata(a); g3.compute_fate_probabilities()                        # GPCCA writes last again
    c2 = CFLARE.from_adata(a)
    assert "macrostates" not in c2.params and "schur" not in c2.params, c2.params
    g4 = GPCCA.from_adata(a)                                                           # its own record: no warning
    assert g4.params["macrostates"]["n_cells"] == 20


def test_estimator_record_is_kept_step_by_step():
    """Review of f416993: a new GPCCA object that runs any step dropped the macrostates' parameters of the earlier one
    (whose macrostates stay in the AnnData), a record written by the old code lost them at the next CFLARE run, and
    initial states that CFLARE did not touch came back without parameters. The record now holds, for every step whose
    results are in the AnnData, the parameters of the run that wrote them."""
    from fatebook.estimators import GPCCA, CFLARE
    from fatebook.gpcca import block_chain
    import json
    sizes = [50, 60, 70, 80]
    L = np.zeros((4, 4)); L[0, 1] = 0.08; L[1, 2] = L[1, 3] = 0.03; L[2, 0] = L[3, 0] = 0.0005
    def chain():
        a = ad.AnnData(np.zeros((sum(sizes), 1)), obs=pd.DataFrame(
            {"clusters": pd.Categorical(np.repeat(["prog", "mid", "A", "B"], sizes))}, index=[f"c{i}" for i in range(sum(sizes))]))
        a.obsp[Key.obsp.T()] = block_chain(sizes, leak=L, seed=0)
        g = GPCCA(a); g.compute_schur(n_components=6); g.compute_macrostates(n_states=4, cluster_key="clusters", n_cells=20)
        g.set_initial_states_from_macrostates(["prog"]); g.set_terminal_states_from_macrostates(["A", "B"])
        return a, g
    a, g = chain()
    GPCCA(a).compute_eigendecomposition(k=6)                                      # a new object, another step
    g2 = GPCCA.from_adata(a)
    assert g2.params["macrostates"]["n_cells"] == 20 and g2.params["initial_states"] == g.params["initial_states"]
    g2.set_terminal_states_from_macrostates(["A", "B"])
    assert g2.terminal_states.value_counts().to_dict() == {"A": 20, "B": 20}
    a, g = chain()                                                                 # CFLARE leaves the initial states alone
    c = CFLARE(a); c.compute_eigendecomposition(k=6); c.compute_terminal_states(use=3)
    g3 = GPCCA.from_adata(a)
    assert g3.params["initial_states"] == g.params["initial_states"] and g3.params["terminal_states"] == c.params["terminal_states"]
    c3 = CFLARE.from_adata(a)
    assert "macrostates" not in c3.params and c3.params["initial_states"] == g.params["initial_states"]
    a, g = chain()                                                                 # a record of the old form (last writer only)
    k = Key.uns.estimator(False); rec = dict(a.uns[k])
    a.uns[k] = {x: rec[x] for x in ("class", "backward", "kernel", "obsp_key")} | {"params": json.dumps(g.params)}
    CFLARE(a).compute_eigendecomposition(k=6)
    assert GPCCA.from_adata(a).params["macrostates"]["n_cells"] == 20
    a, g = chain()                                                                 # results that are gone lose their record
    g.compute_macrostates(n_states=3, cluster_key="clusters")                      # (new macrostates drop the states)
    assert "terminal_states" not in json.loads(a.uns[k]["params"]) and "initial_states" not in json.loads(a.uns[k]["params"])


def test_forbidden_n_states_survive_another_eigendecomposition():
    """GPCCA, then CFLARE's eigendecomposition on the same AnnData (it replaces the stored eigendecomposition, and with
    it the list of forbidden n_states): GPCCA.from_adata still refuses an n_states that splits a complex pair (it
    accepted n_states=5 and split the pair, found in review). The list is read from the Schur matrix."""
    from fatebook.estimators import GPCCA, CFLARE
    from fatebook.gpcca import block_chain
    sizes = [50, 60, 70, 80]
    L = np.zeros((4, 4)); L[0, 1] = 0.08; L[1, 2] = L[1, 3] = 0.03; L[2, 0] = L[3, 0] = 0.0005
    a = ad.AnnData(np.zeros((sum(sizes), 1)), obs=pd.DataFrame(
        {"clusters": pd.Categorical(np.repeat(["prog", "mid", "A", "B"], sizes))}, index=[f"c{i}" for i in range(sum(sizes))]))
    a.obsp[Key.obsp.T()] = block_chain(sizes, leak=L, seed=0)
    g = GPCCA(a); g.compute_schur(n_components=6)
    forb = g.eigendecomposition["forbidden"]
    assert forb, "the test needs a complex pair"
    CFLARE(a).compute_eigendecomposition(k=6)
    assert "forbidden" not in a.uns[Key.uns.eigendecomposition(False)]
    g2 = GPCCA.from_adata(a)
    with pytest.raises(ValueError, match="would split a complex conjugate pair"):
        g2.compute_macrostates(n_states=forb[0], cluster_key="clusters")
    assert g2._forbidden() == forb


def test_schur_replaces_the_recorded_eigendecomposition_and_from_adata_uses_the_schur_eigengap():
    """Review of d2d2f00 / fd258af: a new GPCCA's Schur rewrites the stored eigendecomposition entry, so CFLARE's
    eigendecomposition parameters leave the record; and GPCCA.from_adata after a CFLARE eigendecomposition takes its
    eigenvalues, eigengap (n_states=None) and forbidden n_states from the Schur matrix (it took CFLARE's eigengap: 2
    states instead of 4)."""
    import json, logging
    from fatebook.estimators import GPCCA, CFLARE
    from fatebook.gpcca import block_chain
    sizes = [50, 60, 70, 80]
    L = np.zeros((4, 4)); L[0, 1] = 0.08; L[1, 2] = L[1, 3] = 0.03; L[2, 0] = L[3, 0] = 0.0005
    a = ad.AnnData(np.zeros((sum(sizes), 1)), obs=pd.DataFrame(
        {"clusters": pd.Categorical(np.repeat(["prog", "mid", "A", "B"], sizes))}, index=[f"c{i}" for i in range(sum(sizes))]))
    a.obsp[Key.obsp.T()] = block_chain(sizes, leak=L, seed=0)
    k = Key.uns.estimator(False)
    CFLARE(a).compute_eigendecomposition(k=10)
    assert "eigendecomposition" in json.loads(a.uns[k]["params"])
    g = GPCCA(a); g.compute_schur(n_components=8)
    assert "eigendecomposition" not in json.loads(a.uns[k]["params"])
    eg, D, forb = g.eigendecomposition["eigengap"], g.eigendecomposition["D"], g.eigendecomposition["forbidden"]
    assert eg + 1 == 4
    CFLARE(a).compute_eigendecomposition(k=3)
    g2 = GPCCA.from_adata(a)
    assert g2.eigendecomposition["eigengap"] == eg and g2.eigendecomposition["forbidden"] == forb
    np.testing.assert_allclose(g2.eigendecomposition["D"], D)
    g2.compute_macrostates(n_states=None, cluster_key="clusters")
    assert len(g2.macrostates.cat.categories) == 4
    c2 = CFLARE.from_adata(a)                                           # CFLARE keeps its own eigendecomposition
    assert len(c2.eigendecomposition["D"]) == 3 and "V_r" in c2.eigendecomposition
    # fourth review: the same through a CFLARE loaded by from_adata (its merged entry kept the Schur's 'forbidden'),
    # no eigenvectors of the other decomposition ride along, and a reloaded GPCCA's Schur drops CFLARE's record
    a.uns.pop(Key.uns.eigendecomposition(False)); g = GPCCA(a); g.compute_schur(n_components=8)
    c3 = CFLARE.from_adata(a); c3.compute_eigendecomposition(k=3, which="LM")
    g3 = GPCCA.from_adata(a)
    assert g3.eigendecomposition["eigengap"] == eg and "V_r" not in g3.eigendecomposition
    assert g3.eigendecomposition["params"]["which"] == "LR"
    g3.compute_macrostates(n_states=None, cluster_key="clusters")
    assert len(g3.macrostates.cat.categories) == 4
    g3.compute_schur(n_components=8)
    assert "eigendecomposition" not in json.loads(a.uns[k]["params"])
    # fifth review: CFLARE with k = n_components has the Schur's very eigenvalues; the record decides, not they
    CFLARE(a).compute_eigendecomposition(k=8, alpha=50)
    g4 = GPCCA.from_adata(a)
    assert g4.eigendecomposition["eigengap"] == eg and g4.eigendecomposition["forbidden"] == forb


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_pipeline_and_plots_on_a_backed_anndata(kind, dg100, tmp_path):
    """The low-level pipeline on an AnnData opened with backed='r' (X stays in its file; layers and graphs are in
    memory), up to the drivers, gene trends, their plots and CytoTRACE: the same numbers as in memory. (Reading a few
    genes of a dense file failed before: h5py takes increasing indices only.)"""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from fatebook.kernels import VelocityKernel, ConnectivityKernel
    from fatebook.estimators import GPCCA
    from fatebook.trends import compute_gene_trends, plot_heatmap
    from fatebook.plots import plot_lineage_drivers
    from fatebook.cytotrace import cytotrace_score
    a = dg100
    a.X = np.asarray(a.X.toarray(), dtype=np.float32) if kind == "dense" else sp.csr_matrix(a.X)
    a.write_h5ad(tmp_path / "dg.h5ad")
    out = {}
    for mode in ("memory", "backed"):
        b = ad.read_h5ad(tmp_path / "dg.h5ad", backed="r" if mode == "backed" else None)
        try:
            vk, ck = VelocityKernel(b).compute_transition_matrix(), ConnectivityKernel(b).compute_transition_matrix()
            g = GPCCA((0.8 * vk + 0.2 * ck).compute_transition_matrix())
            g.compute_schur(n_components=6).compute_macrostates(n_states=3, cluster_key="clusters")
            g.set_terminal_states_from_macrostates().compute_fate_probabilities()
            d = g.compute_lineage_drivers()
            genes = list(d.index[:3])[::-1]                 # (not in the file's order)
            ts, lt = g.terminal_states, b.obs["latent_time"].to_numpy()   # (the lineage latent time runs towards)
            lin = str(max(ts.cat.categories, key=lambda c: np.nanmean(lt[(ts == c).to_numpy()])))
            tr = compute_gene_trends(g, genes, lineages=[lin], time_key="latent_time", show_progress=False)
            plt.close(plot_heatmap(g, genes, lineages=[lin], time_key="latent_time", trends=tr))
            plt.close(plot_lineage_drivers(g, d.columns[0].rsplit("_", 1)[0], n_genes=3))
            ct = cytotrace_score(b, layer="X", n_genes=20)
            out[mode] = (d.to_numpy(), np.asarray(tr.fits[tr.lineages[0]].mean), ct["score"])
        finally:
            if mode == "backed": b.file.close()
    for x, y in zip(out["memory"], out["backed"]): np.testing.assert_allclose(y, x, rtol=1e-10, atol=1e-12)
