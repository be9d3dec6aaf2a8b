"""Worker: fatebook's Schur + macrostates + fate probabilities on a synthetic chain (made by make_synthetic.py).
usage: fb_large.py H5AD N_STATES N_COMPONENTS [FATE_TOL]"""
import sys, warnings
from _common import Stages, emit
warnings.simplefilter("ignore")
h5ad, n_states, n_comp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fate_kw = dict(tol=float(sys.argv[4])) if len(sys.argv) > 4 and sys.argv[4] != "default" else {}
S = Stages()
with S("import"):
    import numpy as np, anndata as ad
    from fatebook.estimators import GPCCA
with S("read"):
    a = ad.read_h5ad(h5ad)
tips = {c: list(a.obs_names[(a.obs["clusters"] == c).to_numpy()]) for c in ("A_4", "B_4", "C_4")}
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
emit(S.result(tool="fatebook", n=int(a.n_obs), fate_tol=fate_kw.get("tol", "default"), schur_backend=str(g.eigendecomposition.get("method")),
              macrostates=[str(x) for x in g.macrostates.cat.categories],
              eigenvalues=[round(float(np.real(x)), 6) for x in np.asarray(g.eigendecomposition["D"])[:8]],
              fate_means=[round(float(x), 4) for x in np.nanmean(B, 0)]))
