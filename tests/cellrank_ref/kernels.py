"""CellRank 2.3.3 reference transition matrices (runs in .venv-cellrank; see _refio.py for the protocol).

args: h5ad (a path, or a dict {name: path}: several datasets in one process, so numba compiles once; results
are then keyed "<name>__<result>"), time_key (obs key for the PseudotimeKernel, or null), softmax_scale (float or null: the fixed
scale used for the 'vk_fixed' matrix), frac_to_keep, b, nu, extras (bool: also cosine/dot_product/backward).
results: `<name>` CSR matrices, `<name>_softmax_scale` floats, `<name>_params` dicts, and timings.
"""
import sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from _refio import run


def main(h5ad, **kw):
    if isinstance(h5ad, dict):
        out = {}
        for name, path in h5ad.items():
            out.update({f"{name}__{k}": v for k, v in one(path, **kw).items()})
        return out
    return one(h5ad, **kw)


def one(h5ad, time_key=None, softmax_scale=None, frac_to_keep=0.3, b=10.0, nu=0.5, extras=True, n_jobs=1):
    warnings.simplefilter("ignore")
    import anndata as ad, numpy as np, cellrank as cr
    from cellrank.kernels import VelocityKernel, ConnectivityKernel, PseudotimeKernel
    a = ad.read_h5ad(h5ad)
    res, secs = {"cellrank_version": cr.__version__, "n_obs": int(a.n_obs)}, {}

    def vk(name, backward=False, adata=None, **kw):
        t = time.perf_counter()
        k = VelocityKernel(a if adata is None else adata, backward=backward).compute_transition_matrix(
            model="deterministic", n_jobs=n_jobs, show_progress_bar=False, **kw)
        secs[name] = time.perf_counter() - t
        res[name] = k.transition_matrix
        res[f"{name}_softmax_scale"] = float(k.params["softmax_scale"])
        res[f"{name}_params"] = {key: (v if isinstance(v, (str, bool, type(None))) else float(v))
                                 for key, v in k.params.items() if isinstance(v, (str, bool, int, float, type(None)))}
        return k

    k_vk = vk("vk")  # correlation, softmax scale estimated
    scale = float(softmax_scale) if softmax_scale is not None else res["vk_softmax_scale"]
    vk("vk_fixed", softmax_scale=scale)
    if extras:
        vk("vk_cosine", similarity="cosine")
        vk("vk_dot_product", similarity="dot_product")
        vk("vk_bwd_transpose", backward=True, backward_mode="transpose")
        # CellRank 2.3.3 quirk: backward_mode='negate' negates the velocity rows *in place* in the kernel's internal
        # copy, so with an estimated scale the second pass negates them back and the result is the *forward* matrix.
        # The reference is therefore taken with the (correct, sign-invariant) forward scale given, which is right.
        vk("vk_bwd_negate", backward=True, backward_mode="negate", softmax_scale=res["vk_softmax_scale"])
        k_neg_est = VelocityKernel(a, backward=True).compute_transition_matrix(
            model="deterministic", backward_mode="negate", n_jobs=n_jobs, show_progress_bar=False)
        res["negate_estimated_equals_forward"] = bool(abs(k_neg_est.transition_matrix - res["vk"]).max() < 1e-12)
    for dn in (True, False):
        t = time.perf_counter()
        ck = ConnectivityKernel(a).compute_transition_matrix(density_normalize=dn)
        secs[f"ck_dnorm_{dn}"] = time.perf_counter() - t
        res[f"ck_dnorm_{dn}"] = ck.transition_matrix
    t = time.perf_counter()
    ck = ConnectivityKernel(a).compute_transition_matrix(density_normalize=True)
    comb = (0.8 * k_vk + 0.2 * ck).compute_transition_matrix()
    secs["combined"] = time.perf_counter() - t
    res["combined"] = comb.transition_matrix
    if time_key is not None:
        for scheme in ("hard", "soft"):
            t = time.perf_counter()
            pk = PseudotimeKernel(a, time_key=time_key).compute_transition_matrix(
                threshold_scheme=scheme, frac_to_keep=frac_to_keep, b=b, nu=nu, n_jobs=n_jobs, show_progress_bar=False)
            secs[f"pk_{scheme}"] = time.perf_counter() - t
            res[f"pk_{scheme}"] = pk.transition_matrix
        pkb = PseudotimeKernel(a, time_key=time_key, backward=True).compute_transition_matrix(
            threshold_scheme="hard", frac_to_keep=frac_to_keep, n_jobs=n_jobs, show_progress_bar=False)
        res["pk_bwd_hard"] = pkb.transition_matrix
    res["kernel_seconds"] = secs
    return res


if __name__ == "__main__":
    run(main)
