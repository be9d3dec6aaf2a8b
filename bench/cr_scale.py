"""Worker: CellRank 2.3.3's low-level pipeline on a scale data set (make_scale.py), the same stages as fb_scale.py;
Schur by METHOD ('krylov': SLEPc Krylov-Schur, fates by PETSc; 'brandts': dense, small n only).
usage: cr_scale.py H5AD N_STATES N_COMPONENTS METHOD"""
import sys, warnings
from _common import Stages, emit
warnings.simplefilter("ignore")
h5ad, n_states, n_comp, method = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
S = Stages(memory=True)
with S("import"):
    import numpy as np, anndata as ad, cellrank as cr
with S("read"):
    a = ad.read_h5ad(h5ad)
with S("pipeline"):
    with S("velocity_kernel"):
        vk = cr.kernels.VelocityKernel(a).compute_transition_matrix()
    with S("connectivity_kernel"):
        ck = cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
    with S("combination"):
        k = 0.8 * vk + 0.2 * ck
        k.transition_matrix
    with S("schur"):
        g = cr.estimators.GPCCA(k)
        g.compute_schur(n_components=n_comp, method=method)
    with S("macrostates"):
        g.compute_macrostates(n_states=n_states, cluster_key="clusters")
    with S("terminal_states"):
        g.set_terminal_states(states=list(g.macrostates.cat.categories))
    with S("fate_probabilities"):
        g.compute_fate_probabilities(use_petsc=method == "krylov", show_progress_bar=False)
    with S("drivers"):
        d = g.compute_lineage_drivers()
B = np.asarray(g.fate_probabilities.X)
emit(S.result(tool=f"cellrank {cr.__version__}", n=int(a.n_obs), schur_backend=method,
              macrostates=[str(x) for x in g.macrostates.cat.categories],
              eigenvalues=[round(float(np.real(x)), 6) for x in np.asarray(g.eigendecomposition["D"])[:8]],
              fate_means=[round(float(x), 4) for x in np.nanmean(B, 0)]))
