"""Worker: fatebook's Schur + macrostates + fate probabilities on a synthetic chain (made by make_synthetic.py).
usage: fb_large.py H5AD N_STATES N_COMPONENTS [FATE_TOL]"""
import sys, warnings
from _common import Stages, emit
warnings.simplefilter("ignore")
SCHUR = {}
def _capture(orig):
    "Keep the backend's own numbers (products with T, restarts) of the estimator's sorted_schur call."
    def f(*a, **k):
        r = orig(*a, **k); SCHUR.update({k_: v for k_, v in r.params.items() if isinstance(v, (int, float, str))}); return r
    return f
h5ad, n_states, n_comp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fate_kw = dict(tol=float(sys.argv[4])) if len(sys.argv) > 4 and sys.argv[4] != "default" else {}
S = Stages(memory=True)
with S("import"):
    import numpy as np, anndata as ad
    from fatebook.estimators import GPCCA
    import fatebook.schur as _fs
_fs.sorted_schur = _capture(_fs.sorted_schur)
with S("read"):
    a = ad.read_h5ad(h5ad)
tips = {c: list(a.obs_names[(a.obs["clusters"] == c).to_numpy()]) for c in a.uns.get("tip_clusters", ("A_4", "B_4", "C_4"))}
with S("pipeline"):
    g = GPCCA(a, obsp_key="T_fwd")
    with S("schur"):
        g.compute_schur(n_components=n_comp)
    with S("macrostates"):
        g.compute_macrostates(n_states=n_states, cluster_key="clusters", on_forbidden="next")
    with S("terminal_states"):
        g.set_terminal_states(tips)
    with S("fate_probabilities"):
        g.compute_fate_probabilities(**fate_kw)
B = np.asarray(g.fate_probabilities)
def _product_ms(T, reps=10):
    "Milliseconds per product T @ x on fatebook's threads (RowSplit): the unit of the memory-traffic bound."
    import time
    from fatebook.linalg import RowSplit
    A, x = RowSplit(T), np.ones(T.shape[0]); A @ x
    t = time.perf_counter()
    for _ in range(reps): A @ x
    return round((time.perf_counter() - t) / reps * 1e3, 3)

emit(S.result(tool="fatebook", n=int(a.n_obs), nnz=int(g.transition_matrix.nnz), fate_tol=fate_kw.get("tol", "default"), schur_backend=str(g.eigendecomposition.get("method")),
              schur_params=SCHUR, product_ms=_product_ms(g.transition_matrix),
              macrostates=[str(x) for x in g.macrostates.cat.categories],
              eigenvalues=[round(float(np.real(x)), 6) for x in np.asarray(g.eigendecomposition["D"])[:8]],
              fate_means=[round(float(x), 4) for x in np.nanmean(B, 0)]))
