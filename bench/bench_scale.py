"""Scale benchmark (issue 14): fatebook and CellRank 2.3.3 + SLEPc side by side, each in fresh processes, on the same file.

Two cases:
- the pipeline (default): velocity + connectivity kernels -> 0.8 vk + 0.2 ck -> Schur (20) -> macrostates (3) ->
  terminal states (the macrostates) -> fate probabilities -> lineage drivers, on a synthetic three-branch tree with
  50 genes and scanpy's 30-nearest-neighbour graph (make_scale.py; or --h5ad with layers Ms/velocity, obsp
  connectivities, obs clusters). Per stage: seconds (median of --repeat runs), CPU seconds, the peak resident memory
  during the stage, the CellRank/fatebook ratio, and each stage's memory-traffic bound (products with T at the
  measured bandwidth).
- --hard long|absorbing|blocks: a slowly mixing chain (fatebook.linalg.slow_chain: long branches, nearly absorbing
  ends, weakly coupled blocks) at --n cells: Schur + macrostates + terminal states + fate probabilities on the
  same matrix (fb_large.py / cr_large.py), CellRank stopped after --timeout seconds.

usage (one command each; the data are generated once into bench/results/cache):
  .venv/bin/python bench/bench_scale.py --n 100000 --repeat 3
  .venv/bin/python bench/bench_scale.py --n 1000000 --no-cellrank
  .venv/bin/python bench/bench_scale.py --hard long --n 100000 --timeout 900
Run under `nice` on a shared machine; the load average is printed with the results. No assertions.
"""
import argparse, os, statistics, subprocess, sys
from _common import (add_threads_arg, thread_env, CELLRANK_PY, FATEBOOK_PY, REPO, RESULTS, fmt_s, has_petsc, machine,
                     run_worker, save, table)

STAGES = ["velocity_kernel", "connectivity_kernel", "combination", "schur", "macrostates", "terminal_states",
          "fate_probabilities", "drivers", "pipeline", "import", "read"]
HARD_STAGES = ["schur", "macrostates", "terminal_states", "fate_probabilities", "pipeline", "import", "read"]


def data_file(a) -> str:
    if a.h5ad: return a.h5ad
    cache = RESULTS / "cache"; cache.mkdir(parents=True, exist_ok=True)
    if a.hard:
        out = cache / f"hard_{a.hard}_{a.n}_seed{a.seed}.h5ad"
        cmd = [str(FATEBOOK_PY), str(REPO / "bench" / "make_hard.py"), a.hard, str(a.n), str(out), "--seed", str(a.seed)]
    else:
        out = cache / f"scale_{a.n}_seed{a.seed}.h5ad"
        cmd = [str(FATEBOOK_PY), str(REPO / "bench" / "make_scale.py"), str(a.n), str(out), "--seed", str(a.seed)]
    if not out.exists():
        print(f"  generating {out.name} ...", flush=True)
        subprocess.run(["nice", *cmd], check=True)
    return str(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--h5ad", default=None, help="read this AnnData instead of generating one (pipeline case)")
    ap.add_argument("--hard", choices=["long", "absorbing", "blocks"], default=None)
    ap.add_argument("--n-states", type=int, default=3)
    ap.add_argument("--n-components", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per worker process (CellRank on hard spectra)")
    ap.add_argument("--no-cellrank", action="store_true")
    add_threads_arg(ap)
    a = ap.parse_args()
    env = thread_env(a.threads)
    path = data_file(a)
    stages = HARD_STAGES if a.hard else STAGES
    if a.hard: (fb, fargs), (cr, cargs) = (("fb_large.py", [path, a.n_states, a.n_components, "default"]),
                                            ("cr_large.py", [path, a.n_states, a.n_components, "default", "krylov"]))
    else: (fb, fargs), (cr, cargs) = (("fb_scale.py", [path, a.n_states, a.n_components]),
                                       ("cr_scale.py", [path, a.n_states, a.n_components, "krylov"]))
    cols = {}
    def runs(label, py, script, wargs):
        out = []
        for i in range(a.repeat):
            print(f"  {label} run {i + 1}/{a.repeat} (load {os.getloadavg()[0]:.1f}) ...", flush=True)
            r = run_worker(py, script, *wargs, env=env, timeout=a.timeout)
            if "error" in r: print(f"  {label} FAILED: {r['error']}", flush=True)
            out.append(r)
        cols[label] = out
    runs("fatebook", FATEBOOK_PY, fb, fargs)
    if not a.no_cellrank:
        ok = subprocess.run(["bash", str(REPO / "tools" / "cellrank_env.sh"), "--check"], capture_output=True).returncode == 0
        if ok and has_petsc(CELLRANK_PY): runs("CellRank+SLEPc", CELLRANK_PY, cr, cargs)
        else: print("  no CellRank env with petsc4py/slepc4py: run `bash tools/cellrank_env.sh --petsc`", flush=True)
    names = list(cols)
    good = {n: [r for r in cols[n] if "error" not in r] for n in names}
    med = lambda n, key, s: (statistics.median(v) if (v := [r[key][s] for r in good[n] if s in r.get(key, {})]) else None)
    rows = []
    for s in stages:
        vals = [med(n, "seconds", s) for n in names]
        cpu = med("fatebook", "cpu_seconds", s)
        sys_ = med("fatebook", "sys_cpu_seconds", s)
        mem = med("fatebook", "stage_peak_rss_mb", s)
        crm = med(names[-1], "stage_peak_rss_mb", s) if len(names) > 1 else None
        ratio = f"{vals[1] / vals[0]:.1f}x" if len(vals) > 1 and vals[0] and vals[1] is not None else "-"
        rows.append([s, *map(fmt_s, vals), fmt_s(cpu), fmt_s(sys_), f"{mem:.0f}" if mem else "-", *( [f"{crm:.0f}" if crm else "-"] if len(names) > 1 else []), ratio])
    rows.append(["peak RSS (MB)", *[f"{statistics.median([r['peak_rss_mb'] for r in good[n]] or [float('nan')]):.0f}" for n in names],
                 "", "", "", *([""] if len(names) > 1 else []), ""])
    m = machine()
    what = (f"slowly mixing chain '{a.hard}'" if a.hard else "pipeline (kernels -> drivers)") + f" n={a.n:,}"
    text = (f"{what}, n_states={a.n_states}, n_components={a.n_components}, median of {a.repeat} fresh-process run(s); "
            f"{m['date']}, {m['cpus']} CPUs, load average {m['loadavg']}, threads {a.threads or 'default'}\n"
            + table(rows, ["stage (s)", *names, "fatebook CPU s", "of which sys", "fatebook peak MB", *(["CellRank peak MB"] if len(names) > 1 else []),
                           "CellRank / fatebook"]))
    for n in names:
        if good[n]:
            r = good[n][0]
            text += (f"\n{n}: Schur {r.get('schur_backend')} {r.get('schur_params', '')}, leading eigenvalues "
                     f"{r.get('eigenvalues')}, macrostates {r.get('macrostates')}, mean fates {r.get('fate_means')}")
            if r.get("adata_added_keys"): text += f"\n  AnnData keys added: { {k: v for k, v in r['adata_added_keys'].items() if v} }"
            pm, prods = r.get("product_ms"), (r.get("schur_params") or {}).get("products")
            pr = r.get("product_ms_rcm")   # (the Schur step iterates in RCM order from 100,000 cells: its bound is there)
            if pm and prods:
                text += (f"\n  memory-traffic bound: one product with T ({r.get('nnz', 0):,} non-zeros) takes {pm:.1f} ms in the "
                         f"cells' order" + (f" and {pr:.1f} ms in the RCM order the Schur step iterates in" if pr else "")
                         + f", so the Schur step's {prods} products need >= {prods * (pr or pm) / 1e3:.2f} s (it took "
                         f"{r['seconds'].get('schur', 0):.2f} s); a single pass over the edges (kernels) costs about one "
                         "product in the cells' order")
    print("\n" + text)
    tag = f"hard_{a.hard}_{a.n}" if a.hard else f"scale_{a.n}"
    print(f"\nwritten: {save(tag, dict(machine=m, args=vars(a), runs=cols), text)}")


if __name__ == "__main__":
    sys.exit(main())
