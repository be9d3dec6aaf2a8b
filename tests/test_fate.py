"""Fate (absorption) probabilities, absorption times, unreachable cells and the Lineage array.

Hand-solvable references: gambler's ruin (closed forms for hitting probabilities, durations, variances and
conditional durations), small chains solved by hand, and dense fundamental-matrix references.
"""
import pickle
import resource
import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from fatebook.core import has_module
from fatebook.core import palette
from fatebook.fate import Lineage, fate_probabilities, absorption_times, unreachable_cells, gamblers_ruin
from fatebook.schur import knn_chain, sorted_schur

needs_petsc = pytest.mark.skipif(not has_module("petsc4py"), reason="petsc4py not installed (pip install 'fatebook[petsc]')")
SOLVERS = ["direct", "gmres", "auto"] + (["petsc"] if has_module("petsc4py") else [])


def dense_fates(T, labels):
    T = T.toarray() if sp.issparse(T) else np.asarray(T)
    tr = np.flatnonzero(labels < 0)
    K = labels.max() + 1
    S = np.stack([T[np.ix_(tr, np.flatnonzero(labels == k))].sum(1) for k in range(K)], 1)
    B = np.zeros((len(T), K)); B[labels >= 0, labels[labels >= 0]] = 1
    B[tr] = np.linalg.solve(np.eye(len(tr)) - T[np.ix_(tr, tr)], S)
    return B


def as_labels(terminal, n):
    "Terminal dict {name: cells} -> int labels (-1 transient), in the dict's order."
    if isinstance(terminal, dict):
        lab = np.full(n, -1)
        for j, v in enumerate(terminal.values()): lab[np.asarray(v)] = j
        return lab
    return np.asarray(terminal)


def fate_residual(T, terminal, B) -> float:
    """Largest relative residual ||b_k - Q b_k - s_k|| / ||s_k|| over the lineages k, on the transient cells with
    finite fates: an independent check of a solve (rows summing to 1 hold by construction, since fatebook derives one
    lineage as 1 minus the others, so a row-sum check cannot fail)."""
    T = sp.csr_matrix(T, dtype=float); n = T.shape[0]
    lab = as_labels(terminal, n); X = np.asarray(B, float)[:, :lab.max() + 1]
    tr = np.flatnonzero((lab < 0) & np.isfinite(X).all(1))
    Tt = T[tr]
    worst = 0.0
    for k in range(lab.max() + 1):
        s_k = np.asarray(Tt[:, np.flatnonzero(lab == k)].sum(1)).ravel()
        r = X[tr, k] - Tt[:, tr] @ X[tr, k] - s_k
        worst = max(worst, float(np.linalg.norm(r) / max(np.linalg.norm(s_k), 1e-300)))
    return worst


# ---------------------------------------------------------------- fate probabilities

@pytest.mark.parametrize("p", [0.5, 0.3, 0.62])
@pytest.mark.parametrize("solver", SOLVERS)
def test_gamblers_ruin_exact(p, solver):
    N = 30
    B, info = fate_probabilities(gamblers_ruin(N, p), {"ruin": [0], "win": [N]}, solver=solver, tol=1e-12)  # exact answers
    i = np.arange(N + 1)
    win = i / N if p == 0.5 else (1 - ((1 - p) / p) ** i) / (1 - ((1 - p) / p) ** N)
    np.testing.assert_allclose(B["win"].X.ravel(), win, atol=1e-9)
    np.testing.assert_allclose(B["ruin"].X.ravel(), 1 - win, atol=1e-9)   # both columns against the closed form
    assert fate_residual(gamblers_ruin(N, p), {"ruin": [0], "win": [N]}, B) < 1e-10
    assert info["solver"].startswith(solver if solver != "auto" else "direct")
    assert B.names == ["ruin", "win"]


def test_hand_solved_branching_chain():
    # 0 -> 1 (1/2) | 2 (1/2); 1 -> A (2/3) | 0 (1/3); 2 -> B (1/4) | 0 (1/4) | A (1/2)
    # b0 = (b1 + b2)/2, b1 = 2/3 + b0/3, b2 = 1/2 + b0/4  =>  b0 = 14/17 (prob. of A from 0)
    T = np.zeros((5, 5))
    T[0, 1] = T[0, 2] = .5
    T[1, 3], T[1, 0] = 2 / 3, 1 / 3
    T[2, 4], T[2, 0], T[2, 3] = .25, .25, .5
    T[3, 3] = T[4, 4] = 1
    B, _ = fate_probabilities(sp.csr_matrix(T), {"A": [3], "B": [4]})
    b0 = 14 / 17
    np.testing.assert_allclose(B["A"].X.ravel(), [b0, 2 / 3 + b0 / 3, .5 + b0 / 4, 1, 0], atol=1e-14)
    c0 = 3 / 17   # B from 0, solved by hand like A (not 1 - A: fatebook derives one column as 1 minus the others)
    np.testing.assert_allclose(B["B"].X.ravel(), [c0, c0 / 3, .25 + c0 / 4, 0, 1], atol=1e-14)


def test_solvers_agree_on_knn_chain():
    T, t, b = knn_chain(3000, seed=3)
    labels = np.full(3000, -1); labels[(t > 0.97) & (b == 0)] = 0; labels[(t > 0.97) & (b == 1)] = 1
    labels[t < 0.01] = 2  # a third, "early" terminal class
    ref = dense_fates(T, labels)
    for solver in SOLVERS:
        B, info = fate_probabilities(T, labels, solver=solver)
        np.testing.assert_allclose(B.X, ref, atol=1e-6, err_msg=solver)
        assert info["n_unreachable"] == 0 and info["residual"] < 1e-8


@needs_petsc
@pytest.mark.petsc
def test_petsc_agrees_with_direct():
    T, t, b = knn_chain(2000, seed=1)
    labels = np.where(t > 0.97, b, -1)
    Bd, _ = fate_probabilities(T, labels, solver="direct")
    Bp, ip = fate_probabilities(T, labels, solver="petsc")
    assert ip["solver"] == "petsc"
    np.testing.assert_allclose(Bp.X, Bd.X, atol=1e-6)


def test_dense_input_and_mask_terminal():
    G = gamblers_ruin(8, 0.4)
    B1, _ = fate_probabilities(G.toarray(), {"ruin": np.arange(9) == 0, "win": np.arange(9) == 8})
    B2, _ = fate_probabilities(G, np.array([0] + [-1] * 7 + [1]), names=["ruin", "win"])
    np.testing.assert_allclose(B1.X, B2.X, atol=1e-14)


def test_single_terminal_state():
    B, _ = fate_probabilities(gamblers_ruin(6), {"ends": [0, 6]})
    np.testing.assert_allclose(B.X, 1.0)


# ---------------------------------------------------------------- unreachable cells

def _chain_with_closed_class():
    # cells 0..4 feed terminal 0 and a closed non-terminal pair {5,6}; cell 7 is an isolated loop
    T = np.zeros((8, 8))
    T[0, 0] = 1
    T[1, 0], T[1, 2] = .5, .5
    T[2, 1], T[2, 3] = .5, .5
    T[3, 2], T[3, 4] = .5, .5
    T[4, 3], T[4, 5] = .5, .5
    T[5, 6] = T[6, 5] = 1
    T[7, 7] = 1
    return sp.csr_matrix(T)


@pytest.mark.filterwarnings("ignore::scipy.sparse.SparseEfficiencyWarning")
def test_unreachable_detected_structurally():
    T = _chain_with_closed_class()
    u = unreachable_cells(T, np.arange(8) == 0)
    assert u.tolist() == [False, False, False, False, False, True, True, True]
    # explicit zeros do not count as edges
    T2 = T.copy(); T2[5, 0] = 0.0
    assert unreachable_cells(T2, np.arange(8) == 0)[5]


def test_unreachable_modes():
    T = _chain_with_closed_class()
    lab = np.array([0] + [-1] * 7)
    B, info = fate_probabilities(T, lab, names=["A"])
    assert np.isnan(B.X[[5, 6, 7]]).all() and not np.isnan(B.X[:5]).any()
    assert info["n_unreachable"] == 3 and info["unreachable"].tolist() == [False] * 5 + [True] * 3
    # gambler's ruin on 0..5 with 5 = leak: hitting 0 from i is 1 - i/5
    np.testing.assert_allclose(B.X[:5, 0], 1 - np.arange(5) / 5, atol=1e-12)
    np.testing.assert_allclose(info["escape"][:5], np.arange(5) / 5, atol=1e-12)
    with pytest.raises(ValueError, match="cannot reach any terminal state"):
        fate_probabilities(T, lab, unreachable="raise")
    Bl, _ = fate_probabilities(T, lab, unreachable="lineage")
    assert Bl.names == ["0", "unreachable"]
    np.testing.assert_allclose(Bl["0"].X.ravel(), [1, .8, .6, .4, .2, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(Bl["unreachable"].X.ravel(), [0, .2, .4, .6, .8, 1, 1, 1], atol=1e-12)
    with pytest.raises(ValueError, match="unreachable"):
        fate_probabilities(T, lab, unreachable="ignore")


def test_disconnected_component_on_knn_chain():
    T1, t1, b1 = knn_chain(600, seed=1)
    T2, _, _ = knn_chain(400, seed=2)
    T = sp.block_diag([T1, T2]).tocsr()
    lab = np.full(1000, -1); lab[:600][t1 > 0.95] = b1[t1 > 0.95]
    B, info = fate_probabilities(T, lab)
    assert info["n_unreachable"] == 400 and np.isnan(B.X[600:]).all()
    assert fate_residual(T, lab, B) < 1e-6


# ---------------------------------------------------------------- validation, no mutation

def test_bad_input_errors_and_no_mutation():
    G = gamblers_ruin(10, 0.4)
    G0 = G.copy()
    cases = [({"a": [0], "b": [0, 10]}, "overlaps"), ({"a": []}, "no cells"), ({"a": [11]}, "outside"),
             (np.full(11, -1), "no terminal cell"), (np.array([0] + [-1] * 9 + [2]), "without gaps"),
             ([0, 1], "int array")]
    for term, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fate_probabilities(G, term)
    with pytest.raises(ValueError, match="row-stochastic"):
        fate_probabilities(G * 0.9, {"a": [0]})
    with pytest.raises(ValueError, match="solver='cg' is not valid"):
        fate_probabilities(G, {"a": [0], "b": [10]}, solver="cg")
    assert (G != G0).nnz == 0


# ---------------------------------------------------------------- absorption times

@pytest.mark.parametrize("solver", ["direct", "gmres"])
def test_absorption_time_closed_forms(solver):
    N = 20
    G = gamblers_ruin(N, 0.5)
    i = np.arange(N + 1)
    at = absorption_times(G, {"ends": [0, N]}, calculate_variance=True, solver=solver)
    assert list(at.columns) == ["ends_mean", "ends_var"]
    np.testing.assert_allclose(at["ends_mean"], i * (N - i), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(at["ends_var"], i * (N - i) * (i ** 2 + (N - i) ** 2 - 2) / 3, rtol=1e-7, atol=1e-6)
    # conditioned on winning: (N^2 - i^2)/3 (symmetric walk)
    atc = absorption_times(G, {"ruin": [0], "win": [N]}, solver=solver)
    np.testing.assert_allclose(atc["win_mean"].values[1:], (N ** 2 - i[1:] ** 2) / 3, rtol=1e-8)
    assert atc["win_mean"].iloc[0] == np.inf and atc["win_mean"].iloc[-1] == 0


def test_absorption_times_vs_dense_reference_biased():
    T, t, b = knn_chain(400, seed=5, bias=8)
    lab = np.where(t > 0.9, b, -1)
    at = absorption_times(T, lab, calculate_variance=True, names=["b0", "b1"])
    A = T.toarray(); tr = np.flatnonzero(lab < 0)
    Q = A[np.ix_(tr, tr)]; N = np.linalg.inv(np.eye(len(tr)) - Q)
    B = dense_fates(T, lab)[tr]
    for j, nm in enumerate(["b0", "b1"]):
        bj = B[:, j]
        keep = bj > 1e-8
        Qh = Q[np.ix_(keep, keep)] * bj[keep][None, :] / bj[keep][:, None]  # D^-1 Q D
        Nh = np.linalg.inv(np.eye(keep.sum()) - Qh)
        m = Nh.sum(1); v = (2 * Nh - np.eye(keep.sum())) @ m - m ** 2
        np.testing.assert_allclose(at[f"{nm}_mean"].values[tr][keep], m, rtol=1e-7)
        np.testing.assert_allclose(at[f"{nm}_var"].values[tr][keep], v, rtol=1e-6, atol=1e-6)
        assert (at[f"{nm}_mean"].values[lab == j] == 0).all() and np.isinf(at[f"{nm}_mean"].values[lab == 1 - j]).all()
        assert np.isnan(at[f"{nm}_var"].values[lab == 1 - j]).all()
    # the unconditional time to either end (merged key) = N 1
    atm = absorption_times(T, lab, names=["b0", "b1"], keys=["b0, b1"])
    np.testing.assert_allclose(atm["b0, b1_mean"].values[tr], N.sum(1), rtol=1e-8)


def test_absorption_times_with_leak_are_infinite():
    T = _chain_with_closed_class()
    at = absorption_times(T, np.array([0] + [-1] * 7), calculate_variance=True)
    assert at["0_mean"].iloc[0] == 0 and np.isinf(at["0_mean"].iloc[1:]).all()


# ---------------------------------------------------------------- Lineage

def test_lineage_behaviour():
    X = np.random.default_rng(0).dirichlet(np.ones(3), size=10)
    lin = Lineage(X, names=["A", "B", "C"])
    assert lin.colors == palette(3)
    assert lin[["C", "A"]].names == ["C", "A"]
    np.testing.assert_allclose(lin["A, C"].X.ravel(), X[:, 0] + X[:, 2])
    assert lin["A, C"].names == ["A, C"]
    assert lin[:4, ["B"]].shape == (4, 1)
    assert lin[2:5].names == ["A", "B", "C"] and lin[2:5].shape == (3, 3)
    np.testing.assert_allclose(lin[:, 1], X[:, 1])
    assert type(lin.sum(1)) is np.ndarray and type(np.asarray(lin)) is np.ndarray
    lt = lin.T
    assert lt.shape == (3, 10) and lt["B"].shape == (1, 10)
    lin2 = pickle.loads(pickle.dumps(lin))
    assert lin2.names == lin.names and lin2.colors == lin.colors
    c = lin.copy(); c.names = ["x", "y", "z"]
    assert lin.names == ["A", "B", "C"]
    assert Lineage(X, colors=["red", "green", "blue"]).colors == ["#ff0000", "#008000", "#0000ff"]
    assert len(set(palette(30))) == 30
    with pytest.raises(KeyError, match="valid names"):
        lin["D"]
    with pytest.raises(ValueError, match="unique"):
        Lineage(X, names=["A", "A", "B"])
    with pytest.raises(ValueError, match="names"):
        Lineage(X, names=["A"])
    assert "Lineage" in lin._repr_html_()


def test_priming_degree_by_hand():
    lin = Lineage(np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]]), names=list("abc"))
    kl = np.array([0, np.log2(1 / 0.2), 0.1 * np.log2(0.1 / 0.2) + 0.1 * np.log2(0.1 / 0.3) + 0.8 * np.log2(0.8 / 0.5)])
    np.testing.assert_allclose(lin.priming_degree(early_cells=[0]), kl / kl.max(), atol=1e-12)
    with pytest.raises(ValueError, match="entropy"):
        lin.priming_degree("nope")


# ---------------------------------------------------------------- n = 50,000: no dense n x n anywhere

@pytest.mark.slow
def test_50k_schur_and_fates_memory_and_time():
    n = 50_000
    T, t, b = knn_chain(n, seed=0)
    labels = np.where(t > 0.98, b, -1)
    tracemalloc.start()
    t0 = time.perf_counter()
    s = sorted_schur(T, 20)
    t1 = time.perf_counter()
    B, info = fate_probabilities(T, labels)
    t2 = time.perf_counter()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nn={n}: Schur ({s.method}, m={s.n_components}) {t1 - t0:.1f} s, residual {s.residual:.1e}; "
          f"fates ({info['solver']}) {t2 - t1:.1f} s; traced peak {peak / 2 ** 20:.0f} MiB, max RSS {rss:.0f} MiB "
          f"(a dense n x n float64 array would be {n * n * 8 / 2 ** 30:.1f} GiB)")
    assert s.method == "sstep" and s.residual < 1e-8     # 'auto' on sparse input from 20,000 cells
    np.testing.assert_allclose(s.vectors[:, 0], 1.0)
    assert fate_residual(T, labels, B) < 1e-6
    assert peak < 2 * 2 ** 30 and peak < n * n * 8 / 8  # far below one dense n x n array
    # the fates of the two branches separate
    late = (t > 0.6) & (labels < 0)
    assert (B.X[late & (b == 0), 0] > 0.5).mean() > 0.95 and (B.X[late & (b == 1), 1] > 0.5).mean() > 0.95


# ---------------------------------------------------------------- real data: pancreas (2,000 of the original genes)

@pytest.fixture(scope="module")
def pancreas_T(pancreas_pp_path):
    import anndata as ad
    from fatebook.kernels import ConnectivityKernel
    from fatebook.velocity import VelocityKernel
    a = ad.read_h5ad(pancreas_pp_path)
    k = 0.8 * VelocityKernel(a).compute_transition_matrix() + 0.2 * ConnectivityKernel(a).compute_transition_matrix()
    return sp.csr_matrix(k.transition_matrix), a.obs["clusters"].astype(str).to_numpy()


@pytest.mark.slow
def test_pancreas_solvers_agree_and_schur_backends(pancreas_T):
    import scipy.linalg as sla
    T, cl = pancreas_T
    term = {c: np.flatnonzero(cl == c)[:30] for c in ["Alpha", "Beta", "Epsilon", "Delta"]}
    ref, _ = fate_probabilities(T, term, solver="direct")
    assert fate_residual(T, term, ref) < 1e-10
    for solver in SOLVERS[1:]:
        B, info = fate_probabilities(T, term, solver=solver)
        np.testing.assert_allclose(B.X, ref.X, atol=1e-6, err_msg=solver)
    # the strongest fate of most Beta cells is Beta
    beta = np.flatnonzero(cl == "Beta")[30:]
    assert (ref.X[beta].argmax(1) == ref.names.index("Beta")).mean() > 0.9
    s = sorted_schur(T, 20)
    assert s.residual < 1e-8 and s.forbidden == forbidden_from_eigs(s.eigenvalues)
    if has_module("slepc4py"):
        k = sorted_schur(T, 20, method="krylov")
        assert sla.subspace_angles(s.vectors[:, :10], k.vectors[:, :10]).max() < 1e-6


def forbidden_from_eigs(lam):
    return [m for m in range(2, len(lam)) if abs(lam[m - 1].imag) > 1e-12 and np.isclose(lam[m - 1], np.conj(lam[m]))]


@pytest.mark.parametrize("embed", [False, True])
def test_non_finite_deflation_is_dropped_with_a_warning(embed, monkeypatch):
    """Schur vectors with a NaN (a broken decomposition) used to reach the deflation basis and stop the solve with
    LinAlgError('Eigenvalues did not converge') (found in review); they are now dropped with a warning, and the fates
    are those of the undeflated solve. A non-finite Schur matrix with finite vectors keeps the vectors (the relation
    fails its check and A Z comes from a product). Both systems (sliced and embedded, forced through the thresholds)."""
    from helpers import capture_log
    import fatebook.fate as F
    from fatebook.linalg import knn_chain
    from fatebook.schur import sorted_schur
    if embed: monkeypatch.setattr(F, "_EMBED_MIN", 0); monkeypatch.setattr(F, "_EMBED_OTHER", 1.0)
    T, t, b = knn_chain(2000, n_branches=3, bias=20.0, seed=1)
    top = np.argsort(t)[-60:]; lab = np.full(2000, -1); lab[top] = b[top]
    sr = sorted_schur(T, 8, method="arpack")
    ref, _ = F.fate_probabilities(T, lab, solver="gmres", tol=1e-10)
    Xn = sr.vectors.copy(); Xn[7, 3] = np.nan
    for d in ((Xn, sr.matrix), Xn):
        with capture_log() as log:
            B, inf = F.fate_probabilities(T, lab, solver="gmres", tol=1e-10, deflate=d)
        assert any("not finite" in m for m in log), log
        np.testing.assert_allclose(np.asarray(B), np.asarray(ref), atol=1e-8)
        assert np.isnan(Xn[7, 3]) and np.isfinite(sr.vectors).all()   # the inputs are not changed
    # finite vectors with a non-finite Schur matrix: the relation fails its check, the vectors are still used (A Z by
    # a product), without a warning, and with as few iterations as the plain vectors
    Ri = np.where(np.eye(len(sr.matrix)) > 0, np.inf, sr.matrix)
    with capture_log() as log:
        B, inf = F.fate_probabilities(T, lab, solver="gmres", tol=1e-10, deflate=(sr.vectors, Ri))
    assert not any("not finite" in m for m in log), log
    np.testing.assert_allclose(np.asarray(B), np.asarray(ref), atol=1e-8)
    assert inf["iterations"] == F.fate_probabilities(T, lab, solver="gmres", tol=1e-10, deflate=sr.vectors)[1]["iterations"]


@pytest.mark.parametrize("embed", [False, True])
def test_schur_relation_deflation_solves_as_products_do(embed, monkeypatch):
    """The deflation the estimators use, from the Schur relation in factors (`linalg._Relation`: no Z or A Z formed,
    the basis built from X in a few passes), solves as the one from products does: the same iterations and the fates of
    sparse LU, on both systems (sliced and embedded, forced through the thresholds), with terminal cells at three branch
    ends and two closed cells that no walk leaves (unreachable, so an escape column rides along)."""
    import scipy.sparse as sp
    import fatebook.fate as F
    from fatebook.linalg import knn_chain, _Relation
    from fatebook.schur import sorted_schur
    if embed: monkeypatch.setattr(F, "_EMBED_MIN", 0); monkeypatch.setattr(F, "_EMBED_OTHER", 1.0)
    T, t, b = knn_chain(3000, n_branches=3, bias=20.0, seed=2)
    T = T.tolil(); i, j = np.argsort(t)[1500:1502]; T[i] = 0; T[j] = 0; T[i, j] = 1.0; T[j, i] = 1.0; T = sp.csr_matrix(T)
    top = np.argsort(t)[-90:]; lab = np.full(3000, -1); lab[top] = b[top]
    sr = sorted_schur(T, 10)
    kinds = []
    def spy(*a, **k):
        d = real(*a, **k); kinds.append(type(d).__name__); return d
    real = F._deflation_input; monkeypatch.setattr(F, "_deflation_input", spy)
    Bd, _ = F.fate_probabilities(T, lab, solver="direct", unreachable="lineage")
    Br, ir = F.fate_probabilities(T, lab, solver="gmres", tol=1e-10, deflate=(sr.vectors, sr.matrix), unreachable="lineage")
    Bp, ip = F.fate_probabilities(T, lab, solver="gmres", tol=1e-10, deflate=sr.vectors, unreachable="lineage")
    assert kinds == ["NoneType", _Relation.__name__, "ndarray"], kinds   # (the relation passed its check)
    assert ir["n_unreachable"] == 2 and ir["iterations"] == ip["iterations"], (ir, ip)
    np.testing.assert_allclose(np.asarray(Br), np.asarray(Bd), atol=1e-8)
    np.testing.assert_allclose(np.asarray(Br), np.asarray(Bp), atol=1e-9)
