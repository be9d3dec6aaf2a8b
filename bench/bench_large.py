"""Large case: Schur + macrostates + fate probabilities on a synthetic n-cell kNN chain (default n = 50,000;
bench/make_synthetic.py: a root and three branches, k = 30 neighbours, 0.8 * drift softmax + 0.2 * kNN), fatebook's
default path (sparse s-step Krylov–Schur from 20,000 cells, ARPACK below; no PETSc) vs CellRank 2.3.3 with SLEPc (Krylov-Schur, PETSc GMRES), each in a
fresh process, with the peak resident memory of each process (resource.getrusage ru_maxrss).

CellRank without SLEPc would densify the n x n matrix for its Brandts Schur (20 GB at n = 50,000): it is run only
with --cellrank-brandts and only for n <= 5,000.

usage: .venv/bin/python bench/bench_large.py [--n 50000] [--n-states 4] [--n-components 20] [--repeat 1] [--threads T] [--fate-tol TOL]
Writes bench/results/large_*.json|txt. No assertions (shared 2-core machine: noisy timings).
"""
import argparse, statistics, subprocess, sys
from _common import (add_threads_arg, thread_env, CELLRANK_PY, FATEBOOK_PY, REPO, RESULTS, fmt_s, has_petsc, machine, run_worker, save, table)

STAGES = ["schur", "macrostates", "terminal_states", "fate_probabilities", "pipeline", "import", "read"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--n-states", type=int, default=4)
    ap.add_argument("--n-components", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fate-tol", default="default",
                    help="relative tolerance of both tools' iterative fate solvers (default: each tool's own default: "
                         "fatebook 1e-8, CellRank 1e-6)")
    ap.add_argument("--no-cellrank", action="store_true")
    ap.add_argument("--cellrank-brandts", action="store_true")
    add_threads_arg(ap)
    a = ap.parse_args()
    env = thread_env(a.threads)
    data = RESULTS / "cache" / f"synthetic_{a.n}_seed{a.seed}.h5ad"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(FATEBOOK_PY), str(REPO / "bench" / "make_synthetic.py"), str(a.n), str(data),
                        "--seed", str(a.seed)], check=True)
    args = [data, a.n_states, a.n_components, a.fate_tol]
    cols = {}
    def runs(label, py, script, extra):
        out = []
        for i in range(a.repeat):
            print(f"  {label} run {i + 1}/{a.repeat} ...", flush=True)
            r = run_worker(py, script, *args, *extra, env=env)
            if "error" in r: print(f"  {label} FAILED: {r['error']}", flush=True)
            out.append(r)
        cols[label] = out
    runs("fatebook", FATEBOOK_PY, "fb_large.py", [])
    if not a.no_cellrank:
        ok = subprocess.run(["bash", str(REPO / "tools" / "cellrank_env.sh")], capture_output=True).returncode == 0
        if ok and has_petsc(CELLRANK_PY):
            runs("CellRank (SLEPc)", CELLRANK_PY, "cr_large.py", ["krylov"])
        else:
            print("  CellRank env without petsc4py/slepc4py: run `bash tools/cellrank_env.sh --petsc` for the "
                  "reference column", flush=True)
        if ok and a.cellrank_brandts and a.n <= 5000:
            runs("CellRank (no PETSc)", CELLRANK_PY, "cr_large.py", ["brandts"])
    names = list(cols)
    med = lambda rs, k: (statistics.median(v) if (v := [r["seconds"][k] for r in rs if "error" not in r
                                                         and k in r["seconds"]]) else None)
    rows = []
    for s in STAGES:
        vals = [med(cols[n], s) for n in names]
        best = min((v for v in vals[1:] if v is not None), default=None)
        rows.append([s, *map(fmt_s, vals), f"{best / vals[0]:.1f}x" if (vals[0] and best is not None) else "-"])
    rss = [statistics.median([r["peak_rss_mb"] for r in cols[n] if "error" not in r] or [float("nan")]) for n in names]
    rows.append(["peak RSS (MB)", *[f"{x:.0f}" for x in rss], "-"])
    m = machine()
    text = (f"synthetic kNN chain n={a.n:,}, n_states={a.n_states}, n_components={a.n_components}, median of "
            f"{a.repeat} fresh-process run(s); {m['date']}, {m['cpus']} CPUs, load average {m['loadavg']}, "
            f"threads {a.threads or 'default'}, fate solver tol {a.fate_tol}\n"
            + table(rows, ["stage (s)", *names, "CellRank / fatebook"]))
    for n in names:
        ok = [r for r in cols[n] if "error" not in r]
        if ok: text += (f"\n{n}: Schur backend {ok[0].get('schur_backend')}, leading eigenvalues {ok[0].get('eigenvalues')}, "
                        f"macrostates {ok[0].get('macrostates')}, mean fates {ok[0].get('fate_means')}")
    print("\n" + text)
    print(f"\nwritten: {save(f'large_{a.n}', dict(machine=m, args=vars(a), runs=cols), text)}")


if __name__ == "__main__":
    sys.exit(main())
