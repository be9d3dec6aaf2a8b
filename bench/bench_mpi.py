"""Beyond one machine: the distributed path (`mpiexec -n N python -m fatebook.distributed`: SLEPc Krylov–Schur for the
Schur vectors, PETSc GMRES for the fate probabilities, T distributed by contiguous row blocks) at 1 and 2 ranks on
bench_scale.py's data (make_scale.py: scanpy's 30-NN graph, T = 0.8 VelocityKernel + 0.2 ConnectivityKernel built by
fatebook; default n = 1,000,000; --data synthetic: make_synthetic.py's chain), each run a fresh `mpiexec`, with the
stage times, the products with T (PETSc's MatMult counter: count, ms per product, bytes sent), the peak resident
memory of every rank, and the machine load (`uptime`) before and after each run.

Two row orders of the same chain: `given` (make_synthetic's cells in random order: a row block references cells of
every other block) and `rcm` (reverse Cuthill–McKee of the kNN graph: neighbours get nearby indices, so a row block
needs few values from other ranks). --compare also runs fatebook's single-process default (threaded s-step Schur,
block GMRES fates) in a fresh process and checks that both agree (Schur subspace angle, max fate difference).

The single process also runs from a second random start vector (seed 1, untimed): its angle to the first run is how
well the m-vector span of this T is determined at the residuals any solver reaches, the floor of any agreement.
Angles are also given at every cut k (the first k vectors) that splits no complex pair.

usage: .venv/bin/python bench/bench_mpi.py [--n 1000000] [--ranks 1 2] [--order given rcm] [--n-components 20]
                                           [--repeat 1] [--compare] [--data scale|synthetic] [--no-deflate]
Writes bench/results/mpi_*.json|txt. No assertions (shared 2-core machine: noisy timings; see the uptime columns).
"""
import argparse, json, os, subprocess, sys, tempfile, time
import numpy as np
from _common import BENCH, FATEBOOK_PY, REPO, RESULTS, emit, fmt_s, machine, peak_rss_mb, run_worker, save, table

TIPS = ["A_4", "B_4", "C_4"]   # the last position bin of each branch (make_synthetic.py): the terminal states


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def prepare(n, seed, order, data="scale"):
    """The chain as .h5 (CSR group 'T') + terminal labels (.npy), in the given or the RCM row order (cached).
    data='scale': make_scale.py's data (bench_scale.py's input: scanpy's 30-NN graph, 50 genes, velocity) and fatebook's
    T = 0.8 VelocityKernel + 0.2 ConnectivityKernel, as bench_scale.py builds it; data='synthetic': make_synthetic.py's T."""
    cache = RESULTS / "cache"; cache.mkdir(parents=True, exist_ok=True)
    out, lab = cache / f"mpi_{data}_{n}_seed{seed}_{order}.h5", cache / f"mpi_{data}_{n}_seed{seed}_{order}_terminal.npy"
    if out.exists() and lab.exists(): return out, lab
    if data == "scale":
        h5ad = cache / f"scale_{n}_seed{seed}.h5ad"              # shared with bench_scale.py
        maker, tkey = "make_scale.py", None
    else:
        h5ad = cache / f"synthetic_{n}_seed{seed}.h5ad"          # shared with bench_large.py
        maker, tkey = "make_synthetic.py", "T_fwd"
    if not h5ad.exists():
        subprocess.run([str(FATEBOOK_PY), str(BENCH / maker), str(n), str(h5ad), "--seed", str(seed)], check=True)
    code = f"""
import numpy as np, scipy.sparse as sp, anndata as ad
from scipy.sparse.csgraph import reverse_cuthill_mckee
from fatebook.distributed import write_csr
A = ad.read_h5ad({str(h5ad)!r})
if {tkey!r} is None:
    from fatebook.kernels import VelocityKernel, ConnectivityKernel
    vk = VelocityKernel(A).compute_transition_matrix(); ck = ConnectivityKernel(A).compute_transition_matrix()
    T = (0.8 * vk + 0.2 * ck).compute_transition_matrix().transition_matrix.tocsr()
else:
    T = A.obsp[{tkey!r}].tocsr()
cl = np.asarray(A.obs['clusters'].astype(str)); del A
lab = np.full(T.shape[0], -1, np.int64)
for i, t in enumerate({TIPS!r}): lab[cl == t] = i
if {order!r} == 'rcm':
    p = reverse_cuthill_mckee((T + T.T).tocsr(), symmetric_mode=True)
    T = T[p][:, p].tocsr(); lab = lab[p]
write_csr(T, {str(out)!r}); np.save({str(lab)!r}, lab)
"""
    subprocess.run([str(FATEBOOK_PY), "-c", code], check=True, cwd=REPO)
    return out, lab


def run_mpi(ranks, data, lab, m, timeout=7200, tol=None, deflate=True):
    with tempfile.TemporaryDirectory(prefix="bench-mpi-") as d:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        mpiexec = "mpiexec.mpich" if subprocess.run(["which", "mpiexec.mpich"], capture_output=True).returncode == 0 else "mpiexec"
        cmd = [mpiexec, "-n", str(ranks), str(FATEBOOK_PY), "-m", "fatebook.distributed", str(data), "--terminal", str(lab),
               "--n-components", str(m), "--out", os.path.join(d, "out.h5")] + ([] if tol is None else ["--tol", str(tol)]) \
              + ([] if deflate else ["--no-deflate"])
        before, t = uptime(), time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        wall, after = time.perf_counter() - t, uptime()
        line = [l for l in r.stdout.splitlines() if l.startswith("FATEBOOK-MPI ")]
        if r.returncode or not line:
            return dict(error=f"exit {r.returncode}: " + "\n".join(r.stderr.strip().splitlines()[-8:]), load_before=before)
        res = json.loads(line[-1][len("FATEBOOK-MPI "):])
        res.update(wall_seconds=wall, load_before=before, load_after=after)
        import h5py
        with h5py.File(os.path.join(d, "out.h5")) as f:   # kept for --compare (n x m and n x 3)
            np.save(os.path.join(RESULTS, "cache", f"mpi_result_{ranks}_X.npy"), f["schur/vectors"][()])
            np.save(os.path.join(RESULTS, "cache", f"mpi_result_{ranks}_B.npy"), f["fates/probabilities"][()])
        return res


def worker(data, lab, m):
    "Single-process fatebook default on the same file (fresh process): stage times, peak memory, results saved."
    import scipy.sparse as sp
    t = time.perf_counter()
    from fatebook.distributed import read_rows, matrix_shape
    from fatebook.schur import sorted_schur
    from fatebook.fate import fate_probabilities
    n = matrix_shape(data)[0]
    T = read_rows(data, 0, n); labels = np.load(lab)
    st = dict(read=time.perf_counter() - t)
    t = time.perf_counter(); res = sorted_schur(T, m); st["schur"] = time.perf_counter() - t
    t = time.perf_counter(); B, inf = fate_probabilities(T, labels, show_progress=False); st["fates"] = time.perf_counter() - t
    np.save(RESULTS / "cache" / "mpi_result_ref_X.npy", res.vectors); np.save(RESULTS / "cache" / "mpi_result_ref_B.npy", np.asarray(B))
    out = dict(seconds=st, peak_rss_mb=peak_rss_mb(), method=res.method, fate_solver=inf["solver"], residual=res.residual,
               forbidden=[int(k) for k in res.forbidden], eigenvalues=[[float(e.real), float(e.imag)] for e in res.eigenvalues])
    # The same solver from another random start vector (untimed): how well the span itself is determined at the
    # residuals any solver reaches. Two solvers cannot be expected to agree better than this.
    res1 = sorted_schur(T, m, seed=1, show_progress=False)
    np.save(RESULTS / "cache" / "mpi_result_ref1_X.npy", res1.vectors)
    emit(dict(out, residual_seed1=res1.residual))


def angle(X, Y):
    "Largest principal angle (radians) between span(X) and span(Y)."
    from scipy.linalg import subspace_angles
    return float(subspace_angles(X, Y).max())


def cut_angles(X, Y, forbidden):
    """Largest principal angle between the spans of the first k columns of two sorted Schur bases, for every k that
    splits no complex pair (the leading k columns of a sorted Schur basis span an invariant subspace)."""
    m = min(X.shape[1], Y.shape[1])
    return {k: angle(X[:, :k], Y[:, :k]) for k in range(1, m + 1) if k not in set(forbidden)}


def agreement(X0, X, B0=None, B=None, forbidden=()):
    "Largest angle of the whole span, the angle at every cut, and the largest fate difference."
    d = dict(schur_angle=angle(X0, X), cut_angles=cut_angles(X0, X, forbidden))
    if B is not None: d["fate_max_abs_diff"] = float(np.nanmax(np.abs(B0 - B)))
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--order", nargs="+", default=["given", "rcm"], choices=["given", "rcm"])
    ap.add_argument("--n-components", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="scale", choices=["scale", "synthetic"],
                    help="scale: make_scale.py + fatebook's kernels (bench_scale.py's T); synthetic: make_synthetic.py's T")
    ap.add_argument("--tol", type=float, default=None, help="SLEPc tolerance of the Ritz pairs (default: fatebook.distributed's, 1e-15)")
    ap.add_argument("--no-deflate", action="store_true", help="fates without the run's Schur vectors as deflation space")
    ap.add_argument("--compare", action="store_true", help="also run fatebook's single-process default and compare")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker: return worker(a.worker[0], a.worker[1], int(a.worker[2]))
    rows, agree_text, payload = [], [], dict(machine=machine(), n=a.n, n_components=a.n_components, tol=a.tol, deflate=not a.no_deflate, runs=[])
    for order in a.order:
        data, lab = prepare(a.n, a.seed, order, a.data)
        ok = set()   # rank counts whose last run in this order succeeded (their results are in the cache)
        for ranks in a.ranks:
            for i in range(a.repeat):
                print(f"  {order} order, {ranks} rank(s), run {i + 1}/{a.repeat} (load {uptime()}) ...", flush=True)
                r = run_mpi(ranks, data, lab, a.n_components, tol=a.tol, deflate=not a.no_deflate)
                r.update(order=order, ranks_requested=ranks); payload["runs"].append(r)
                if "error" in r: print("  FAILED:", r["error"], flush=True); ok.discard(ranks); continue
                ok.add(ranks)
                st = r["stages"]; mx = lambda k: max(s.get(k, 0) for s in st)
                pr = r.get("products") or [{}]
                ps = lambda k: pr[0].get(k, {}).get("count", 0)
                ms = lambda k: 1e3 * max(p.get(k, {}).get("seconds", 0) for p in pr) / max(ps(k), 1)
                mb = lambda k: sum(p.get(k, {}).get("MB", 0) for p in pr) / max(ps(k), 1)
                rows.append([order, ranks, fmt_s(mx("read")), fmt_s(mx("schur")), fmt_s(mx("fates")), fmt_s(mx("write")),
                             fmt_s(r["wall_seconds"]), r["schur"]["restarts"], "/".join(map(str, r["fates"]["iterations"])),
                             f"{ps('schur')} / {ps('fates')}", f"{ms('schur'):.1f} / {ms('fates'):.1f}", f"{mb('schur'):.2f}",
                             " / ".join(str(round(max(x.values()))) for x in r["peak_rss_mb"]),
                             " / ".join(f"{g:,}" for g in r.get("ghosts", [])), r["load_before"], r["load_after"]])
                print("   ", rows[-1], flush=True)
        if a.compare and order == a.order[0]:
            print(f"  single-process fatebook default (load {uptime()}) ...", flush=True)
            before = uptime()
            ref = run_worker(FATEBOOK_PY, "bench_mpi.py", "--worker", data, lab, a.n_components, timeout=7200)
            ref.update(load_before=before, load_after=uptime(), order=order); payload["single_process"] = ref
            if "error" not in ref:
                X0, B0 = np.load(RESULTS / "cache" / "mpi_result_ref_X.npy"), np.load(RESULTS / "cache" / "mpi_result_ref_B.npy")
                forb = ref.get("forbidden", [])
                agree = {"single, seed 1": agreement(X0, np.load(RESULTS / "cache" / "mpi_result_ref1_X.npy"), forbidden=forb)}
                for ranks in sorted(ok):   # only the runs that succeeded (a failed one is reported above)
                    X, B = (np.load(RESULTS / "cache" / f"mpi_result_{ranks}_{s}.npy") for s in "XB")
                    agree[ranks] = agreement(X0, X, B0, B, forb)
                payload["agreement"] = agree
                s = ref["seconds"]
                rows.append([order, "1 (fatebook)", fmt_s(s["read"]), fmt_s(s["schur"]), fmt_s(s["fates"]), "-",
                             fmt_s(ref["wall_seconds"]), ref["method"], ref["fate_solver"], "-", "-", "-",
                             str(round(ref["peak_rss_mb"])), "-",
                             ref["load_before"], ref["load_after"]])
                print("   ", rows[-1], flush=True)
                for who, d in agree.items():
                    agree_text.append(f"agreement with the single process (seed 0), {who}: span {d['schur_angle']:.1e}"
                                      + (f", fates {d['fate_max_abs_diff']:.1e}" if "fate_max_abs_diff" in d else "")
                                      + "; by cut " + " ".join(f"{k}:{v:.0e}" for k, v in d["cut_angles"].items()))
                    print("   ", agree_text[-1], flush=True)
            else: print("  single-process FAILED:", ref["error"], flush=True)
    head = ["order", "ranks", "read s", "schur s", "fates s", "write s", "wall s", "restarts", "GMRES its",
            "products schur/fates", "ms/product schur/fates", "MB sent/product", "peak MB/rank", "ghosts/rank", "load before", "load after"]
    text = (f"fatebook.distributed, n = {a.n:,}, m = {a.n_components}, {machine()}\n" + table(rows, head)
            + "".join("\n" + l for l in agree_text))
    print(text)
    print("saved", save("mpi", payload, text))


if __name__ == "__main__":
    main()
