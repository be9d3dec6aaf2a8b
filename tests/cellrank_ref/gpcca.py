"""CellRank 2.3.3 reference for the estimator half (runs in .venv-cellrank; protocol in _refio.py).

Kernel 0.8*VelocityKernel + 0.2*ConnectivityKernel on `h5ad` -> GPCCA: compute_schur(n_components, method) ->
compute_macrostates(n_states, cluster_key) for each n in `n_states_list` (memberships, coarse T) ->
set_terminal_states(terminal) on the macrostates of `n_states` -> compute_fate_probabilities(solver) ->
compute_lineage_drivers().
results: T (CSR), schur_vectors, schur_matrix, eigenvalues_real/imag, memberships_<m>, macrostate_names_<m>,
macrostates_<m> (per-cell label or ""), coarse_T_<m>, terminal_cells (dict name -> cell indices), fate_probs,
fate_names, drivers_corr / drivers_pval / drivers_qval / drivers_ci_low / drivers_ci_high (genes x lineages),
drivers_genes, and timings.
"""
import sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from _refio import run


def main(h5ad, n_components=20, schur_method="brandts", n_states=6, n_states_list=None, cluster_key="clusters",
         terminal=None, fate_solver="direct", fate_tol=1e-12, drivers=True, n_jobs=1):
    warnings.simplefilter("ignore")
    import anndata as ad, numpy as np, cellrank as cr
    a = ad.read_h5ad(h5ad)
    secs, res = {}, {"cellrank_version": cr.__version__}
    t = time.perf_counter()
    vk = cr.kernels.VelocityKernel(a).compute_transition_matrix(n_jobs=n_jobs, show_progress_bar=False)
    ck = cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
    k = 0.8 * vk + 0.2 * ck
    secs["kernels"] = time.perf_counter() - t
    res["T"] = k.transition_matrix
    res["softmax_scale"] = float(vk.params["softmax_scale"])
    g = cr.estimators.GPCCA(k)
    t = time.perf_counter()
    g.compute_schur(n_components=n_components, method=schur_method)
    secs["schur"] = time.perf_counter() - t
    res["schur_vectors"] = np.asarray(g.schur_vectors)
    res["schur_matrix"] = np.asarray(g.schur_matrix)
    ev = np.asarray(g.eigendecomposition["D"])
    res["eigenvalues_real"], res["eigenvalues_imag"] = ev.real.copy(), ev.imag.copy()
    res["eigengap"] = int(g.eigendecomposition["eigengap"])
    for m in sorted(set(n_states_list or []) | {n_states}, key=lambda m: m == n_states):  # n_states last
        t = time.perf_counter()
        g.compute_macrostates(n_states=m, cluster_key=cluster_key)
        secs[f"macrostates_{m}"] = time.perf_counter() - t
        mem = g.macrostates_memberships
        res[f"memberships_{m}"] = np.asarray(mem.X if hasattr(mem, "X") else mem)
        res[f"macrostate_names_{m}"] = [str(x) for x in mem.names]
        res[f"macrostates_{m}"] = [("" if isinstance(x, float) else str(x)) for x in g.macrostates.astype(object)]
        res[f"coarse_T_{m}"] = np.asarray(g.coarse_T.values)
        res[f"coarse_stat_{m}"] = np.asarray(g.coarse_stationary_distribution.values)
        res[f"n_states_used_{m}"] = int(res[f"memberships_{m}"].shape[1])
    t = time.perf_counter()
    g.set_terminal_states(terminal)  # None: every macrostate of the last compute_macrostates
    ts = g.terminal_states
    res["terminal_cells"] = {str(c): np.flatnonzero((ts == c).to_numpy()).tolist() for c in ts.cat.categories}
    g.compute_fate_probabilities(solver=fate_solver, tol=fate_tol, use_petsc=False, show_progress_bar=False)
    secs["fate_probabilities"] = time.perf_counter() - t
    fp = g.fate_probabilities
    res["fate_probs"], res["fate_names"] = np.asarray(fp.X), [str(x) for x in fp.names]
    if drivers:
        t = time.perf_counter()
        d = g.compute_lineage_drivers()
        secs["drivers"] = time.perf_counter() - t
        res["drivers_genes"] = [str(x) for x in d.index]
        for q in ("corr", "pval", "qval", "ci_low", "ci_high"):
            res[f"drivers_{q}"] = np.column_stack([d[f"{n}_{q}"].to_numpy(dtype=float) for n in res["fate_names"]])
    res["seconds"] = secs
    return res


if __name__ == "__main__":
    run(main)
