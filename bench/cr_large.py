"""Worker: CellRank 2.3.3's Schur + macrostates + fate probabilities on a synthetic chain (make_synthetic.py).
usage: cr_large.py H5AD N_STATES N_COMPONENTS FATE_TOL(number|default) METHOD(krylov|brandts)"""
import sys, warnings
from _common import Stages, emit
warnings.simplefilter("ignore")
h5ad, n_states, n_comp, method = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[5]
fate_kw = dict(tol=float(sys.argv[4])) if sys.argv[4] != "default" else {}
S = Stages(memory=True)
with S("import"):
    import numpy as np, anndata as ad, cellrank as cr
with S("read"):
    a = ad.read_h5ad(h5ad)
tips = {c: list(a.obs_names[(a.obs["clusters"] == c).to_numpy()]) for c in a.uns.get("tip_clusters", ("A_4", "B_4", "C_4"))}
with S("pipeline"):
    k = cr.kernels.PrecomputedKernel(a, obsp_key="T_fwd")
    g = cr.estimators.GPCCA(k)
    with S("schur"):
        g.compute_schur(n_components=n_comp, method=method)
    with S("macrostates"):
        g.compute_macrostates(n_states=n_states, cluster_key="clusters")
    with S("terminal_states"):
        g.set_terminal_states(tips)
    with S("fate_probabilities"):
        g.compute_fate_probabilities(use_petsc=method == "krylov", show_progress_bar=False, **fate_kw)
B = np.asarray(g.fate_probabilities.X)
emit(S.result(tool=f"cellrank {cr.__version__}", n=int(a.n_obs), fate_tol=fate_kw.get("tol", "default"), schur_backend=method,
              macrostates=[str(x) for x in g.macrostates.cat.categories],
              eigenvalues=[round(float(np.real(x)), 6) for x in np.asarray(g.eigendecomposition["D"])[:8]],
              fate_means=[round(float(x), 4) for x in np.nanmean(B, 0)]))
