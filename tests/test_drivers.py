"""Integration tests for fatebook.drivers (the unit tests live in nbs/05_drivers.ipynb)."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from fatebook.drivers import bh_qvalues, lineage_drivers


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(42)
    n, g = 150, 40
    B = rng.dirichlet([0.5, 0.5], n)
    lam = np.outer(np.ones(n), rng.uniform(0.05, 2, g)) * np.exp(np.outer(B[:, 0] - 0.5, rng.normal(0, 2, g)))
    X = rng.poisson(lam).astype(float)
    X[:, 0] = 0.0   # an all-zero gene
    X[:, 1] = 3.0   # a constant gene
    return X, B


@pytest.mark.parametrize("method,ref", [("pearson", stats.pearsonr), ("spearman", stats.spearmanr)])
@pytest.mark.parametrize("fmt", ["dense", "csr", "csc", "float32"])
def test_matches_scipy_gene_by_gene(counts, method, ref, fmt):
    X, B = counts
    Xin = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X), "float32": X.astype(np.float32)}[fmt]
    D = lineage_drivers(Xin, B, ["A", "B"], [f"g{i}" for i in range(X.shape[1])], method=method, block_size=9,
                        show_progress=False)
    assert D.loc[["g0", "g1"]].isna().all().all()
    for j in range(2, X.shape[1]):
        for k, lin in enumerate("AB"):
            res = ref(X[:, j], B[:, k])
            assert abs(D[f"{lin}_corr"].iloc[j] - res.statistic) < 1e-10
            assert abs(D[f"{lin}_pval"].iloc[j] - res.pvalue) < 1e-10


def test_r_is_not_inflated(counts):
    # CellRank 2.0.7 multiplied r by n/(n-1); ours equals np.corrcoef exactly (ddof cancels)
    X, B = counts
    D = lineage_drivers(X, B, ["A", "B"], show_progress=False)
    ref = np.corrcoef(X[:, 5], B[:, 0])[0, 1]
    assert abs(D["A_corr"].iloc[5] - ref) < 1e-13
    assert abs(D["A_corr"].iloc[5] - ref * len(X) / (len(X) - 1)) > 1e-4


def test_bh_hand_computation():
    p = np.array([0.001, 0.008, 0.039, 0.041, 0.042, 0.060, 0.074, 0.205, np.nan, 0.212, 0.216])
    m = 10  # the NaN is not counted
    # sorted finite p: i = 1..10; q_(i) = min_{j>=i} p_(j) m / j
    hand = [0.01, 0.04, 0.084, 0.084, 0.084, 0.1, 0.10571428571428572, 0.216, np.nan, 0.216, 0.216]
    q = bh_qvalues(p)
    np.testing.assert_allclose(q, hand, rtol=0, atol=1e-12)
    assert m == np.isfinite(q).sum()
    # q is monotone in p and never below p
    fin = np.isfinite(p)
    assert np.all(q[fin] >= p[fin])
    o = np.argsort(p[fin])
    assert np.all(np.diff(q[fin][o]) >= 0)


def bh_by_definition(p):
    "Benjamini-Hochberg written from its definition (O(m^2), no sorting trick): q_i = min_{p_j >= p_i} min(1, p_j m / #{k: p_k <= p_j})."
    p = np.asarray(p, float); ok = np.isfinite(p); v = p[ok]; m = len(v)
    q = np.full(p.shape, np.nan)
    q[ok] = [min(min(1.0, pj * m / (v <= pj).sum()) for pj in v[v >= pi]) for pi in v]
    return q


def test_qvalues_are_per_lineage(counts):
    "Each lineage's q-values are BH of that lineage's own p-values, checked against BH from its definition."
    X, B = counts
    D = lineage_drivers(X, B, ["A", "B"], show_progress=False)
    for lin in "AB":
        np.testing.assert_allclose(D[f"{lin}_qval"], bh_by_definition(D[f"{lin}_pval"].values), rtol=1e-13, equal_nan=True)
    # the constant genes (NaN p) are not counted in m
    assert np.isnan(D["A_qval"].iloc[:2]).all() and np.isfinite(D["A_qval"].iloc[2:]).all()


@pytest.mark.parametrize("rho,cl", [(0.0, 0.95), (0.6, 0.95), (-0.3, 0.8)])
def test_ci_coverage(rho, cl):
    rng = np.random.default_rng(int(100 * (rho + 1) + 100 * cl))
    n, reps = 40, 2000
    y = rng.normal(size=n)
    X = rho * y[:, None] + np.sqrt(1 - rho ** 2) * rng.normal(size=(n, reps))
    D = lineage_drivers(X, y, ["y"], confidence_level=cl, show_progress=False)
    cover = ((D["y_ci_low"] <= rho) & (rho <= D["y_ci_high"])).mean()
    sd = np.sqrt(cl * (1 - cl) / reps)
    assert abs(cover - cl) < 4 * sd + 0.01, cover


def test_null_pvalues_are_uniform():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(30, 4000))
    y = rng.normal(size=30)
    p = lineage_drivers(X, y, ["y"], show_progress=False)["y_pval"].values
    assert stats.kstest(p, "uniform").pvalue > 1e-3
    assert abs((p < 0.05).mean() - 0.05) < 0.015


def test_spearman_sparse_with_negatives_and_ties():
    rng = np.random.default_rng(3)
    X = rng.integers(-2, 3, (50, 12)).astype(float) * (rng.uniform(size=(50, 12)) < 0.4)
    y = rng.uniform(size=50)
    D = lineage_drivers(sp.csr_matrix(X), y, ["y"], method="spearman", show_progress=False)
    for j in range(12):
        res = stats.spearmanr(X[:, j], y)
        if np.ptp(X[:, j]) == 0:
            assert np.isnan(D["y_corr"].iloc[j])
        else:
            assert abs(D["y_corr"].iloc[j] - res.statistic) < 1e-10


def test_does_not_mutate_inputs(counts):
    X, B = counts
    Xs = sp.csr_matrix(X)
    data0, B0 = Xs.data.copy(), B.copy()
    lineage_drivers(Xs, B, ["A", "B"], method="spearman", show_progress=False)
    np.testing.assert_array_equal(Xs.data, data0)
    np.testing.assert_array_equal(B, B0)


@pytest.fixture(scope="module")
def pancreas_gpcca(_pancreas_pp_session):
    "GPCCA on the preprocessed pancreas (2,531 cells; the file holds 2,000 of the original genes, ~1,000 after filtering)."
    try:
        from fatebook.estimators import GPCCA
        from fatebook.kernels import ConnectivityKernel, VelocityKernel
    except ImportError as e:
        pytest.skip(f"estimator stack not importable: {e}")
    from fatebook.core import settings
    settings.progress_bar = False
    adata = _pancreas_pp_session.copy()
    k = 0.8 * VelocityKernel(adata).compute_transition_matrix() + 0.2 * ConnectivityKernel(adata).compute_transition_matrix()
    g = GPCCA(k)
    g.compute_schur(n_components=20)
    g.compute_macrostates(n_states=12, cluster_key="clusters")
    names = list(g.macrostates.cat.categories)
    assert {"Alpha", "Beta", "Epsilon", "Delta"} <= set(names), names
    g.set_terminal_states_from_macrostates(["Alpha", "Beta", "Epsilon", "Delta"])
    g.compute_fate_probabilities()
    return g


@pytest.mark.slow
def test_pancreas_known_drivers(pancreas_gpcca):
    """Alpha's top driver is Gcg; Beta's top 10 include Ins1/Ins2 or Pdx1/Nkx6-1; Delta's top is Sst; Epsilon's top is Ghrl."""
    D = pancreas_gpcca.compute_lineage_drivers()
    assert list(D.columns[:5]) == ["Alpha_corr", "Alpha_pval", "Alpha_qval", "Alpha_ci_low", "Alpha_ci_high"]
    top = {l: D.sort_values(f"{l}_corr", ascending=False).index[:10].tolist() for l in ["Alpha", "Beta", "Delta", "Epsilon"]}
    print(top)
    assert top["Alpha"][0] == "Gcg"
    assert {"Ins1", "Ins2", "Pdx1", "Nkx6-1"} & set(top["Beta"])
    assert top["Delta"][0] == "Sst"
    assert top["Epsilon"][0] == "Ghrl"
    assert (D.loc["Gcg", "Alpha_qval"] < 1e-50) and (D.loc["Gcg", "Alpha_ci_low"] > 0.5)


_CR_SCRIPT = r'''
import json, sys
import numpy as np, scipy.sparse as sp
from cellrank import Lineage
from cellrank._utils._utils import _correlation_test
a = np.load(sys.argv[1])
X = sp.csr_matrix(a["X"]) if a["sparse"] else a["X"]
names = [str(x) for x in a["names"]]
res = _correlation_test(X, Lineage(a["B"], names=names), gene_names=np.array([str(g) for g in a["genes"]]),
                        method="fisher", confidence_level=0.95)
res.to_csv(sys.argv[2])
'''


@pytest.mark.parity
@pytest.mark.parametrize("sparse", [False, True])
def test_parity_with_cellrank(cellrank_python, tmp_path, sparse):
    """Same table as CellRank 2.3.3's correlation test (Fisher p-values): r and CI to 1e-10, p/q to 1e-9 relative (measured: 3e-15, 3e-12)."""
    import subprocess
    rng = np.random.default_rng(11)
    n, g = 300, 60
    B = rng.dirichlet([1, 1, 1], n)
    X = rng.poisson(np.exp(np.outer(B[:, 0], rng.normal(0, 1.5, g)) - 0.5)).astype(float)
    X[:, 3] = 0.0                                                    # a constant gene
    genes = np.array([f"g{i}" for i in range(g)])
    np.savez(tmp_path / "in.npz", X=X, B=B, names=np.array(["A", "B", "C"]), genes=genes, sparse=sparse)
    (tmp_path / "ref.py").write_text(_CR_SCRIPT)
    r = subprocess.run([str(cellrank_python), str(tmp_path / "ref.py"), str(tmp_path / "in.npz"), str(tmp_path / "ref.csv")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = pd.read_csv(tmp_path / "ref.csv", index_col=0).reindex(genes)
    ours = lineage_drivers(sp.csr_matrix(X) if sparse else X, B, ["A", "B", "C"], genes, pvalue="fisher", show_progress=False)
    assert list(ours.columns) == list(ref.columns)
    assert ours.loc["g3"].isna().all() and ref.loc["g3"].isna().all()
    ok = ours.index != "g3"
    for col in ours.columns:
        a, b = ours.loc[ok, col].to_numpy(), ref.loc[ok, col].to_numpy()
        if col.endswith(("_pval", "_qval")):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-300, err_msg=col)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10, err_msg=col)
