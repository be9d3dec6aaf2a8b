"""Gene trends and heatmaps: fatebook vs CellRank 2.3.3, side by side, every run in a fresh process.

Data: CellRank's pancreas (2,531 cells; the shared file holds 2,000 of the original 27,998 genes, see
../shared/data/README.md), the genes detected in at least 3 of these cells (1,488 of the 2,000: only 1,587 are detected at all in
these cells; CellRank's GAM stops with a 'Fatal model failure' on a gene that is zero everywhere), normalised (`normalize_total` + `log1p`) and kNN-smoothed (the first
moment over the 30-neighbour graph, as scVelo's `Ms`) in X; the fate probabilities of
three lineages (Alpha, Beta, Epsilon) from fatebook's 0.8 velocity + 0.2 connectivity GPCCA pipeline on the
preprocessed pancreas, and its diffusion pseudotime (`dpt_pseudotime`); written once to
.cache/bench_trends_<n_genes>.h5ad in the keys both tools read. Both fit CellRank's default model (pygam GAM, gamma
distribution, log link, 6 splines, lam 3; fatebook's vectorised fit of the same model).

Stages (seconds; each includes the fits):
  trends      fatebook: `compute_gene_trends` (all genes x 3 lineages, 95% bands); CellRank: the same fits through
              `cr.models.GAM` prepare/fit/predict/confidence_interval, one per gene and lineage (what
              `cr.pl.gene_trends` and `cr.pl.heatmap` run internally), `--cr-genes` genes only when given (then
              scaled to all genes and marked '*')
  heatmap     `plot_heatmap` / `cr.pl.heatmap` of all genes along 3 lineages (CellRank: n_jobs=`--cr-jobs`)
  gene_trends `plot_gene_trends` / `cr.pl.gene_trends` of 6 marker genes x 3 lineages with bands

usage: .venv/bin/python bench/bench_trends.py [--n-genes 2000] [--repeat 1] [--cr-jobs 1] [--cr-genes N]
                                                [--threads T] [--no-cellrank] [--skip-cr-heatmap]
Prints a table (ratio = CellRank / fatebook; wall seconds per stage, then CPU seconds, steadier on a shared machine) with the machine load, writes bench/results/trends_*.json|txt.
No assertions: timings on a shared machine are noisy.
"""
from __future__ import annotations
import argparse, json, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CELLRANK_PY, FATEBOOK_PY, REPO, Stages, add_threads_arg, emit, fmt_s, machine, run_worker, save,
                     table, thread_env)

LINEAGES = ["Alpha", "Beta", "Epsilon"]
MARKERS = ["Gcg", "Ins2", "Ghrl", "Sst", "Pdx1", "Neurog3"]
TIME_KEY = "dpt_pseudotime"


def build_input(n_genes: int) -> Path:
    "Write (once) the benchmark AnnData: X = normalised log expression of the first `n_genes` genes, fates, pseudotime."
    out = REPO / ".cache" / f"bench_trends_{n_genes}.h5ad"
    if out.exists(): return out
    import warnings; warnings.simplefilter("ignore")
    import numpy as np, pandas as pd, scanpy as sc, anndata as ad
    from _common import pancreas_pp_path
    from fatebook.core import settings
    from fatebook.datasets import pancreas
    from fatebook.kernels import ConnectivityKernel, VelocityKernel
    from fatebook.gpcca import GPCCA
    settings.progress_bar = False
    pp = ad.read_h5ad(pancreas_pp_path())
    k = 0.8 * VelocityKernel(pp).compute_transition_matrix() + 0.2 * ConnectivityKernel(pp).compute_transition_matrix()
    g = GPCCA(k); g.compute_schur(n_components=20); g.compute_macrostates(n_states=12, cluster_key="clusters")
    g.set_terminal_states_from_macrostates(LINEAGES); g.compute_fate_probabilities()
    import scipy.sparse as sparse
    raw = pancreas()
    raw = raw[pp.obs_names].copy()
    sc.pp.normalize_total(raw); sc.pp.log1p(raw)
    expressed = np.asarray((raw.X > 0).sum(0)).ravel() >= 3        # CellRank's GAM fails outright on unexpressed genes
    genes = list(dict.fromkeys([m for m in MARKERS if m in raw.var_names] + list(raw.var_names[expressed])))[:n_genes]
    # kNN-smoothed expression (scVelo's first moment over the same graph), what CellRank's tutorials fit: on sparse
    # raw counts pygam's gamma fit diverges for rare genes and CellRank stops with a 'Fatal model failure'
    C = sparse.csr_matrix(pp.obsp["connectivities"]) + sparse.eye(pp.n_obs)
    C = sparse.diags(1 / np.asarray(C.sum(1)).ravel()) @ C
    Xs = np.asarray(C @ raw[:, genes].X.toarray() if sparse.issparse(raw.X) else C @ raw[:, genes].X, dtype=np.float32)
    a = ad.AnnData(X=Xs, obs=pp.obs[["clusters", TIME_KEY]].copy(), var=pd.DataFrame(index=genes))
    B = g.fate_probabilities
    a.obsm["lineages_fwd"] = np.asarray(B)                       # CellRank's keys
    ts = g.terminal_states.astype(str).where(g.terminal_states.notna(), None)
    a.obs["term_states_fwd"] = pd.Categorical(ts, categories=list(B.names))
    a.uns["term_states_fwd_colors"] = np.array(B.colors, dtype=object)
    a.obsm["fb_fate_probs_fwd"] = np.asarray(B)                  # fatebook's keys
    a.uns["fb_fate_probs_fwd_names"] = np.array(B.names, dtype=object)
    a.uns["fb_fate_probs_fwd_colors"] = np.array(B.colors, dtype=object)
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp.h5ad"); a.write_h5ad(tmp); tmp.replace(out)
    return out


def worker_fatebook(h5ad: str):
    st = Stages()
    with st("import"):
        import matplotlib; matplotlib.use("agg")
        import matplotlib.pyplot as plt
        import anndata as ad
        from fatebook.core import settings
        from fatebook.trends import compute_gene_trends, plot_heatmap, plot_gene_trends
    settings.progress_bar = False
    with st("read"): a = ad.read_h5ad(h5ad)
    genes = list(a.var_names)
    with st("trends"): tr = compute_gene_trends(a, genes, LINEAGES, time_key=TIME_KEY)
    with st("heatmap"):
        fig = plot_heatmap(a, genes, LINEAGES, time_key=TIME_KEY); fig.savefig("/dev/null", format="png"); plt.close(fig)
    with st("gene_trends"):
        fig = plot_gene_trends(a, MARKERS, LINEAGES, time_key=TIME_KEY); fig.savefig("/dev/null", format="png"); plt.close(fig)
    emit(st.result(n_genes=len(genes), converged=float(sum(f.converged.mean() for f in tr.fits.values()) / len(LINEAGES))))


def worker_cellrank(h5ad: str, n_jobs: str, cr_genes: str, skip_heatmap: str):
    st = Stages()
    with st("import"):
        import warnings; warnings.simplefilter("ignore")
        import matplotlib; matplotlib.use("agg")
        import matplotlib.pyplot as plt
        import anndata as ad, cellrank as cr
    with st("read"): a = ad.read_h5ad(h5ad)
    genes = list(a.var_names)
    sub = genes if int(cr_genes) <= 0 else genes[:int(cr_genes)]
    failed = []
    with st("trends"):
        for lin in LINEAGES:
            for gname in sub:
                m = cr.models.GAM(a)
                m.prepare(gname, lin, time_key=TIME_KEY, n_test_points=200)
                try:
                    m.fit(); m.predict(); m.confidence_interval()
                except RuntimeError:          # 'Fatal model failure' (pygam diverged): counted, the time still counts
                    failed.append(f"{gname}/{lin}")
    extra = dict(n_genes=len(genes), trends_genes=len(sub), trends_failed=failed)
    if skip_heatmap != "1":
        try:
            with st("heatmap"):
                cr.pl.heatmap(a, cr.models.GAM(a), genes, time_key=TIME_KEY, lineages=LINEAGES, n_jobs=int(n_jobs),
                              show_progress_bar=False, save=None)
                plt.savefig("/dev/null", format="png"); plt.close("all")
        except Exception as e:  # CellRank's heatmap stops at the first failed fit
            st.t.pop("heatmap", None); extra["heatmap_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    with st("gene_trends"):
        cr.pl.gene_trends(a, cr.models.GAM(a), MARKERS, time_key=TIME_KEY, lineages=LINEAGES, n_jobs=int(n_jobs),
                          show_progress_bar=False)
        plt.savefig("/dev/null", format="png"); plt.close("all")
    emit(st.result(**extra))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-genes", type=int, default=2000, help="genes (at most the 1,488 detected ones)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--cr-jobs", type=int, default=1, help="CellRank's n_jobs for the plots (default 1)")
    ap.add_argument("--cr-genes", type=int, default=0, help="fit only this many genes in CellRank's 'trends' stage "
                    "and scale the time to all genes (0: all genes)")
    ap.add_argument("--skip-cr-heatmap", action="store_true", help="skip CellRank's heatmap (it refits every gene)")
    ap.add_argument("--no-cellrank", action="store_true")
    add_threads_arg(ap)
    a = ap.parse_args()
    env = thread_env(a.threads)
    h5ad = build_input(a.n_genes)
    print(f"data: {h5ad}", flush=True)
    cols = {"fatebook": [run_worker(FATEBOOK_PY, "bench_trends.py", "--worker", "fb", h5ad, env=env) for _ in range(a.repeat)]}
    if not a.no_cellrank:
        cols["CellRank 2.3.3"] = [run_worker(CELLRANK_PY, "bench_trends.py", "--worker", "cr", h5ad, a.cr_jobs, a.cr_genes,
                                             int(a.skip_cr_heatmap), env=env, timeout=7200) for _ in range(a.repeat)]
    for n, rs in cols.items():
        for r in rs:
            if "error" in r: print(f"{n} FAILED: {r['error']}", flush=True)
    def agg(rs, key, what="seconds"):
        v = [r[what][key] for r in rs if "error" not in r and key in r.get(what, {})]
        return statistics.median(v) if v else None
    names = list(cols); rows = []
    for s in ["import", "read", "trends", "heatmap", "gene_trends"]:
        vals = [agg(cols[n], s) for n in names]
        mark = ""
        if s == "trends" and len(names) > 1 and vals[1] is not None:
            ok = [r for r in cols[names[1]] if "error" not in r]
            if ok and ok[0]["trends_genes"] < ok[0]["n_genes"]:
                vals[1] *= ok[0]["n_genes"] / ok[0]["trends_genes"]; mark = "*"
        ratio = f"{vals[1] / vals[0]:.0f}x" if len(vals) > 1 and vals[0] and vals[1] else "-"
        rows.append([s, *[fmt_s(v) + (mark if i == 1 else "") for i, v in enumerate(vals)], ratio])
        # CPU seconds of the same stage: steadier than wall time on a shared machine
        cpu = [agg(cols[n], s, "cpu_seconds") for n in names]
        if mark and len(cpu) > 1 and cpu[1] is not None: cpu[1] *= vals[1] / agg(cols[names[1]], s) if agg(cols[names[1]], s) else 1
        if all(c is not None for c in cpu):
            rows.append([f"  {s} (CPU)", *[fmt_s(c) + (mark if i == 1 else "") for i, c in enumerate(cpu)],
                         f"{cpu[1] / cpu[0]:.0f}x" if len(cpu) > 1 and cpu[0] else "-"])
    rss = [statistics.median([r["peak_rss_mb"] for r in cols[n] if "error" not in r] or [float("nan")]) for n in names]
    rows.append(["peak RSS (MB)", *[f"{x:.0f}" for x in rss], "-"])
    m = machine()
    for n in names[1:]:
        for r in cols[n]:
            if r.get("trends_failed"): print(f"{n}: {len(r['trends_failed'])} fit(s) failed: {r['trends_failed'][:10]}")
            if r.get("heatmap_error"): print(f"{n}: heatmap failed: {r['heatmap_error']}")
    n_fit = next((r["n_genes"] for rs in cols.values() for r in rs if "n_genes" in r), a.n_genes)
    text = (f"gene trends, pancreas 2,531 cells x {n_fit} genes x {len(LINEAGES)} lineages, median of {a.repeat} "
            f"fresh-process run(s); {m['date']}, {m['cpus']} CPUs, load average {m['loadavg']}, threads "
            f"{a.threads or 'default'}, CellRank n_jobs {a.cr_jobs}\n"
            + table(rows, ["stage (s)", *names, "CellRank / fatebook"]))
    if any("*" in str(r[2]) for r in rows if len(r) > 2):
        text += f"\n* CellRank fitted {a.cr_genes} genes per lineage; time scaled to {n_fit}."
    print("\n" + text)
    print(f"\nwritten: {save('trends', dict(machine=m, args=vars(a), h5ad=str(h5ad), runs=cols), text)}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        kind, rest = sys.argv[2], sys.argv[3:]
        worker_fatebook(*rest) if kind == "fb" else worker_cellrank(*rest)
    else:
        sys.exit(main())
