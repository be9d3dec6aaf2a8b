"""Worker: CellRank 2.3.3's low-level pipeline on the preprocessed pancreas, in a fresh process (run by
bench_pancreas.py inside .venv-cellrank). usage: cr_pancreas.py H5AD N_STATES TERMINAL SCHUR_METHOD(brandts|krylov)"""
import sys, warnings
from _common import Stages, emit
warnings.simplefilter("ignore")
h5ad, n_states, terminal, method = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
S = Stages()
with S("import"):
    import numpy as np, anndata as ad, cellrank as cr
with S("read"):
    a = ad.read_h5ad(h5ad)
use_petsc = method == "krylov"
with S("pipeline"):
    with S("velocity_kernel"):
        vk = cr.kernels.VelocityKernel(a).compute_transition_matrix(show_progress_bar=False)
    with S("connectivity_kernel"):
        ck = cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
    with S("combine"):
        k = (0.8 * vk + 0.2 * ck).compute_transition_matrix()
    g = cr.estimators.GPCCA(k)
    with S("schur"):
        g.compute_schur(n_components=20, method=method)
    with S("macrostates"):
        g.compute_macrostates(n_states=n_states, cluster_key="clusters")
    names = [str(x) for x in g.macrostates.cat.categories]
    with S("terminal_states"):
        g.set_terminal_states([t for t in terminal if t in names] or None)
    with S("fate_probabilities"):
        g.compute_fate_probabilities(use_petsc=use_petsc, show_progress_bar=False)
    with S("drivers"):
        g.compute_lineage_drivers()
emit(S.result(tool=f"cellrank {cr.__version__}", schur_backend=method, macrostates=names,
              softmax_scale=float(vk.params["softmax_scale"]), terminal=[str(x) for x in g.fate_probabilities.names]))
