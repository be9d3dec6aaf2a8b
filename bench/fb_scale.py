"""Worker: fatebook's low-level pipeline on a scale data set (make_scale.py): velocity + connectivity kernels ->
0.8 vk + 0.2 ck -> Schur (N_COMPONENTS) -> macrostates (N_STATES) -> terminal states (the macrostates) -> fate
probabilities -> lineage drivers. Per stage: wall and CPU seconds and the peak resident memory during the stage.
usage: fb_scale.py H5AD N_STATES N_COMPONENTS"""
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
S = Stages(memory=True)
with S("import"):
    import numpy as np, anndata as ad
    import fatebook
    from fatebook.kernels import VelocityKernel, ConnectivityKernel
    from fatebook.estimators import GPCCA
    import fatebook.schur as _fs
_fs.sorted_schur = _capture(_fs.sorted_schur)
with S("read"):
    a = ad.read_h5ad(h5ad)
keys0 = {s: set(getattr(a, s).keys()) for s in ("obs", "obsm", "obsp", "uns", "layers", "varm")}
with S("pipeline"):
    with S("velocity_kernel"):
        vk = VelocityKernel(a).compute_transition_matrix()
    with S("connectivity_kernel"):
        ck = ConnectivityKernel(a).compute_transition_matrix()
    with S("combination"):
        k = (0.8 * vk + 0.2 * ck).compute_transition_matrix()
    with S("schur"):
        g = GPCCA(k)
        g.compute_schur(n_components=n_comp)
    with S("macrostates"):
        g.compute_macrostates(n_states=n_states, cluster_key="clusters")
    with S("terminal_states"):
        g.set_terminal_states_from_macrostates()
    with S("fate_probabilities"):
        g.compute_fate_probabilities()
    with S("drivers"):
        d = g.compute_lineage_drivers()
B = np.asarray(g.fate_probabilities)
added = {s: sorted(set(getattr(a, s).keys()) - keys0[s]) for s in keys0}
ed = g.eigendecomposition
def _product_ms(T, reps=10, order=None):
    """Milliseconds per product T @ x on fatebook's threads (RowSplit): the unit of the memory-traffic bound. With
    `order`, of T renumbered in that order (the Schur step iterates in RCM order from 100,000 cells)."""
    import time
    from fatebook.linalg import RowSplit, permute_states
    if order is not None: T = permute_states(T, order)
    A, x = RowSplit(T), np.ones(T.shape[0]); out = np.empty(T.shape[0]); A.matmul(x, out=out)
    t = time.perf_counter()
    for _ in range(reps): A.matmul(x, out=out)
    return round((time.perf_counter() - t) / reps * 1e3, 3)

def _rcm_product_ms(T):
    "The same in the order the Schur step used (None if it iterated in the cells' own order)."
    if SCHUR.get("reorder") != "rcm": return None
    from fatebook.linalg import locality_order
    return _product_ms(T, order=locality_order(T))

emit(S.result(tool=f"fatebook {fatebook.__version__}", n=int(a.n_obs), nnz=int(k.transition_matrix.nnz),
              schur_backend=str(ed.get("method")), schur_params=SCHUR, product_ms=_product_ms(k.transition_matrix), product_ms_rcm=_rcm_product_ms(k.transition_matrix),
              macrostates=[str(x) for x in g.macrostates.cat.categories],
              eigenvalues=[round(float(np.real(x)), 6) for x in np.asarray(ed["D"])[:8]],
              fate_means=[round(float(x), 4) for x in np.nanmean(B, 0)], adata_added_keys=added))
