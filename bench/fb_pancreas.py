"""Worker: fatebook's low-level pipeline on the preprocessed pancreas, in a fresh process (run by bench_pancreas.py).
usage: fb_pancreas.py H5AD N_STATES TERMINAL(comma-separated)"""
import sys, warnings
from _common import Stages, emit
warnings.simplefilter("ignore")
h5ad, n_states, terminal = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
S = Stages()
with S("import"):
    import numpy as np, anndata as ad
    from fatebook.kernels import VelocityKernel, ConnectivityKernel
    from fatebook.estimators import GPCCA
with S("read"):
    a = ad.read_h5ad(h5ad)
with S("pipeline"):
    with S("velocity_kernel"):
        vk = VelocityKernel(a).compute_transition_matrix()  # first call, softmax scale estimated
    with S("connectivity_kernel"):
        ck = ConnectivityKernel(a).compute_transition_matrix()
    with S("combine"):
        k = (0.8 * vk + 0.2 * ck).compute_transition_matrix()
    g = GPCCA(k)
    with S("schur"):
        g.compute_schur(n_components=20)
    with S("macrostates"):
        g.compute_macrostates(n_states=n_states, cluster_key="clusters")
    names = [str(x) for x in g.macrostates.cat.categories]
    with S("terminal_states"):
        g.set_terminal_states_from_macrostates([t for t in terminal if t in names] or None)
    with S("fate_probabilities"):
        g.compute_fate_probabilities()
    with S("drivers"):
        g.compute_lineage_drivers()
emit(S.result(tool="fatebook", schur_backend=str(g.eigendecomposition.get("method")), macrostates=names,
              softmax_scale=float(vk.params["softmax_scale"]),
              terminal=[str(x) for x in g.fate_probabilities.names]))
