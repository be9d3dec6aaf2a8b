"""fatebook vs CellRank 2.3.3 on the preprocessed pancreas (2,531 cells; 2,000 of the original genes, see
../shared/data/README.md), side by side, every run in a fresh process (first calls include numba compilation,
CellRank's softmax-scale estimation, imports of lazily loaded modules).

Pipeline in both: 0.8*VelocityKernel (deterministic, softmax scale estimated) + 0.2*ConnectivityKernel -> GPCCA:
Schur (20 vectors) -> macrostates (n_states, cluster names) -> terminal states (Alpha/Beta/Delta/Epsilon among the
macrostates) -> fate probabilities -> lineage drivers. fatebook runs its default path (sparse ARPACK Schur, no
PETSc); CellRank runs without PETSc (dense Brandts Schur, scipy GMRES) and, when its env has SLEPc
(`bash tools/cellrank_env.sh --petsc`), with it (Krylov-Schur, PETSc GMRES).

usage: .venv/bin/python bench/bench_pancreas.py [--repeat N] [--n-states 6] [--threads T] [--no-cellrank]
Prints a table (seconds; ratio = best CellRank / fatebook) and writes bench/results/pancreas_*.json|txt.
No assertions: timings on a shared 2-core machine are noisy; re-run on a quiet machine for the record.
"""
import argparse, statistics, subprocess, sys
from _common import (add_threads_arg, thread_env, CELLRANK_PY, FATEBOOK_PY, REPO, fmt_s, has_petsc, machine, pancreas_pp_path, run_worker, save,
                     table)

STAGES = ["velocity_kernel", "connectivity_kernel", "combine", "schur", "macrostates", "terminal_states",
          "fate_probabilities", "drivers", "pipeline"]
TERMINAL = "Alpha,Beta,Delta,Epsilon"


def runs(label, python, script, args, repeat, env=None):
    out = []
    for i in range(repeat):
        print(f"  {label} run {i + 1}/{repeat} ...", flush=True)
        r = run_worker(python, script, *args, env=env)
        if "error" in r: print(f"  {label} FAILED: {r['error']}", flush=True)
        out.append(r)
    return out


def agg(rs, key):
    "Median over the successful runs of a stage's seconds (None if none)."
    v = [r["seconds"][key] for r in rs if "error" not in r and key in r.get("seconds", {})]
    return statistics.median(v) if v else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--n-states", type=int, default=6)
    ap.add_argument("--no-cellrank", action="store_true")
    add_threads_arg(ap)
    a = ap.parse_args()
    env = thread_env(a.threads)
    h5ad = pancreas_pp_path()
    print(f"data: {h5ad}", flush=True)
    cols = {"fatebook": runs("fatebook", FATEBOOK_PY, "fb_pancreas.py", [h5ad, a.n_states, TERMINAL], a.repeat, env)}
    if not a.no_cellrank:
        built = subprocess.run(["bash", str(REPO / "tools" / "cellrank_env.sh")], capture_output=True, text=True)
        if built.returncode != 0:
            print("CellRank env unavailable:\n" + built.stderr[-2000:], flush=True)
        else:
            cols["CellRank (no PETSc)"] = runs("CellRank brandts", CELLRANK_PY, "cr_pancreas.py",
                                               [h5ad, a.n_states, TERMINAL, "brandts"], a.repeat, env)
            if has_petsc(CELLRANK_PY):
                cols["CellRank (SLEPc)"] = runs("CellRank krylov", CELLRANK_PY, "cr_pancreas.py",
                                                [h5ad, a.n_states, TERMINAL, "krylov"], a.repeat, env)
            else:
                print("  (CellRank env has no petsc4py/slepc4py: SLEPc column skipped; "
                      "bash tools/cellrank_env.sh --petsc adds it)", flush=True)
    names = list(cols)
    cr_names = [n for n in names if n != "fatebook"]
    rows = []
    for s in STAGES + ["import", "read"]:
        vals = [agg(cols[n], s) for n in names]
        fb = vals[0]
        best = min((v for v in vals[1:] if v is not None), default=None)
        ratio = f"{best / fb:.1f}x" if (fb and best is not None) else "-"
        rows.append([s, *map(fmt_s, vals), ratio])
    rss = [statistics.median([r["peak_rss_mb"] for r in cols[n] if "error" not in r] or [float("nan")]) for n in names]
    rows.append(["peak RSS (MB)", *[f"{x:.0f}" for x in rss], "-"])
    headers = ["stage (s)", *names, "best CellRank / fatebook"]
    m = machine()
    text = (f"pancreas 2,531 cells, n_states={a.n_states}, median of {a.repeat} fresh-process run(s); {m['date']}, "
            f"{m['cpus']} CPUs, load average {m['loadavg']}, threads {a.threads or 'default'}\n" + table(rows, headers))
    extra = []
    for n in names:
        ok = [r for r in cols[n] if "error" not in r]
        if ok: extra.append(f"{n}: Schur backend {ok[0].get('schur_backend')}, softmax scale {ok[0].get('softmax_scale'):.6g}, "
                            f"macrostates {ok[0].get('macrostates')}, fates {ok[0].get('terminal')}")
    text += "\n" + "\n".join(extra)
    print("\n" + text)
    path = save("pancreas", dict(machine=m, args=vars(a), h5ad=str(h5ad), runs=cols), text)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    sys.exit(main())
