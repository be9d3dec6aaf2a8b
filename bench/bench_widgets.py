"""Live tuning with fatebook.widgets: the time from a value change to the updated figure, for every control, on the
preprocessed pancreas (2,531 cells; the shared file holds 2,000 of the original 27,998 genes, see
../shared/data/README.md), each run in a fresh process.

fatebook: `explore(adata, time_key='dpt_pseudotime')`; each control's `.value` is set as the slider/list would set it,
and the clock stops when the control's observer returns, i.e. when the new PNG is in the Image widget (the comm
message to the browser is sent then; the browser's decoding is not included: tests/test_widgets_browser.py prints the
end-to-end redraw of one slider move in JupyterLab). `cpu` is the process's CPU time for the same change: on a
loaded machine it estimates the wall time on idle cores (the widgets' work runs on one thread: BLAS is limited to
one thread inside them). `first image` is when the figure first changed: for an `n_states`
visited for the first time the unoptimised preview is drawn at once, `figure` is the final one (here the change is made
from code, so the optimisation runs in the foreground; made in the browser, it runs on the widget's worker thread and
the controls answer meanwhile: `first image` is then what the user waits for). `compute` is the widget's own timing of
the step without drawing. Values that were seen before come from the caches and are listed as '(cached)'.

CellRank 2.3.3 (optional, its env `.venv-cellrank`): what a CellRank user re-runs for the same change, compute only
(no figure): the kernel combination, a velocity kernel with the new `softmax_scale`, `compute_macrostates`,
`compute_schur` + `compute_macrostates`, `set_terminal_states` + `compute_fate_probabilities`, ...

Goals of issue 11 (2 cores): n_states / states <= 0.3 s, kernel weights <= 1 s, softmax_scale <= 1 s.

usage: .venv/bin/python bench/bench_widgets.py [--repeat 3] [--threads T] [--no-cellrank]
Prints a table with the machine load (median over the fresh processes), writes bench/results/widgets_*.json|txt.
No assertions: timings on a shared machine are noisy.
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CELLRANK_PY, FATEBOOK_PY, Stages, add_threads_arg, emit, fmt_s, machine, run_worker, save, table,
                     thread_env)

GOALS = {"n_states": 0.3, "terminal_states": 0.3, "initial_states": 0.3, "merge": 0.3, "velocity_weight": 1.0,
         "connectivity_weight": 1.0, "pseudotime_weight": 1.0, "softmax_scale": 1.0}


# ------------------------------------------------------------------------------------------------ fatebook worker
def fb_worker(h5ad: str):
    import warnings; warnings.simplefilter("ignore")
    S = Stages()
    with S("import"):
        import anndata as ad
        from fatebook.widgets import explore
    with S("read"):
        a = ad.read_h5ad(h5ad)
    rows = []

    def change(pane, tab, control, value, label=None, img=None, widget=None):
        "Set `control` to `value` like the UI does; time it and the image updates of the visible view."
        w = widget if widget is not None else pane.w[control]
        img = img if img is not None else pane.views.out[pane.views.visible]
        stamps = []
        h = lambda ch: stamps.append(time.perf_counter())
        img.observe(h, "value")
        c0, t0 = time.process_time(), time.perf_counter()
        if value == "click": w.click()
        else: w.value = value
        t1, c1 = time.perf_counter(), time.process_time()
        img.unobserve(h, "value")
        step = {"kernel": "kernel", "macrostates": "macrostates", "fates": "fates"}[tab]
        rows.append(dict(tab=tab, control=control, value=label or repr(value), seconds=t1 - t0, cpu=c1 - c0,
                         first_image=(stamps[0] - t0) if stamps else None, n_images=len(stamps),
                         compute=pane.timings.get(step) if stamps else None, status=pane.status.kind,
                         message=pane.message[:160]))

    def view(pane, tab, name):
        c0, t0 = time.process_time(), time.perf_counter(); pane.views.show(name)
        rows.append(dict(tab=tab, control="view", value=name, seconds=time.perf_counter() - t0,
                         cpu=time.process_time() - c0, first_image=None,
                         n_images=1, compute=None, status=pane.status.kind, message=""))

    with S("explore (kernel tab drawn)"):
        ex = explore(a, time_key="dpt_pseudotime")
    t = ex.tuner
    for v in (0.3, 0.4, 0.5, 0.2): change(t, "kernel", "connectivity_weight", v)
    for v in (0.7, 0.6, 0.8): change(t, "kernel", "velocity_weight", v)
    change(t, "kernel", "pseudotime_weight", 0.2, "0.2 (new PseudotimeKernel)")
    for v in (0.3, 0.0): change(t, "kernel", "pseudotime_weight", v)
    for v in (2.0, 5.0, 20.0): change(t, "kernel", "softmax_scale", v, f"{v} (new VelocityKernel)")
    change(t, "kernel", "softmax_scale", 5.0, "5.0 (cached)")
    change(t, "kernel", "estimate_scale", True, "estimated (cached)")
    change(t, "kernel", "similarity", "cosine", "'cosine' (new)"); change(t, "kernel", "similarity", "correlation", "'correlation' (cached)")
    change(t, "kernel", "model", "stochastic", "'stochastic' (new)"); change(t, "kernel", "model", "deterministic", "'deterministic' (cached)")
    change(t, "kernel", "backward", True, "True (new)"); change(t, "kernel", "backward", False, "False (cached)")
    change(t, "kernel", "random walks", "click", "100 walks", img=t.views.out["random walks"], widget=t.w["walks"])
    t.views.show("projection")
    change(t, "kernel", "streamlines", True, "on (plots.plot_projection)", widget=t.stream)
    change(t, "kernel", "streamlines", False, "off", widget=t.stream)

    with S("macrostates tab (Schur + macrostates + figure)"):
        ex.show("macrostates")
    m = ex.macro
    forb = set(m.estimator.eigendecomposition["forbidden"])
    first = m.params["n_states"]
    valid = [k for k in range(2, 13) if k not in forb and k != first]
    new = valid[:6]
    for v in new: change(m, "macrostates", "n_states", v, f"{v} (first visit)")
    for v in (new[1], new[3], first): change(m, "macrostates", "n_states", v, f"{v} (cached)")
    if forb: change(m, "macrostates", "n_states", min(forb), f"{min(forb)} (forbidden: message)")
    change(m, "macrostates", "n_states", 6 if 6 not in forb else new[-1], "6 (cached)")
    for v in (20, 40, 30): change(m, "macrostates", "n_cells", v)
    change(m, "macrostates", "cluster_key", "clusters_coarse"); change(m, "macrostates", "cluster_key", "clusters")
    change(m, "macrostates", "n_components", 25, "25 (new Schur vectors)")
    change(m, "macrostates", "n_components", 20, "20 (new Schur vectors)")
    for name in ("coarse T", "spectrum", "candidates"): view(m, "macrostates", name)
    m.views.show("macrostates")

    with S("fates tab (states + fates + figure)"):
        ex.show("fates")
    f = ex.fates
    names = f.names()
    pick = [n for n in names if n.split("_")[0] in ("Alpha", "Beta", "Epsilon", "Delta")]
    change(f, "fates", "terminal_states", tuple(pick[:2]), f"{len(pick[:2])} macrostates")
    change(f, "fates", "terminal_states", tuple(pick[:3]), f"{len(pick[:3])} macrostates")
    change(f, "fates", "terminal_states", tuple(pick), f"{len(pick)} macrostates")
    if len(pick) >= 2: change(f, "fates", "merge", f"{pick[-2]}, {pick[-1]}", "two merged")
    change(f, "fates", "merge", "", "none")
    cur = tuple(f.params["initial_states"] or ())
    ini = tuple([n for n in names if n not in pick and n not in cur][:1]) if not cur else ()
    change(f, "fates", "initial_states", ini, repr(list(ini)))
    change(f, "fates", "initial_states", cur, repr(list(cur)))
    for name in ("states", "by cluster", "drivers", "absorption times"): view(f, "fates", name)
    with S("result tab (code)"):
        ex.show("result")
    emit(S.result(tool="fatebook", rows=rows, n_obs=a.n_obs, first_n_states=first, forbidden=sorted(forb),
                  macrostates=names, terminal=list(f.estimator.fate_probabilities.names)))


# ------------------------------------------------------------------------------------------------ CellRank worker
def cr_worker(h5ad: str, n_states: str, terminal: str):
    import warnings; warnings.simplefilter("ignore")
    S = Stages()
    with S("import"):
        import anndata as ad, cellrank as cr
    with S("read"):
        a = ad.read_h5ad(h5ad)
    rows = []
    def step(tab, control, value, fn):
        t0 = time.perf_counter(); fn()
        rows.append(dict(tab=tab, control=control, value=value, seconds=time.perf_counter() - t0))
    vk = cr.kernels.VelocityKernel(a).compute_transition_matrix(show_progress_bar=False)
    ck = cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
    for w in (0.3, 0.4, 0.5):
        step("kernel", "connectivity_weight", repr(w), lambda: (0.8 * vk + w * ck).compute_transition_matrix())
    for s in (2.0, 5.0, 20.0):
        step("kernel", "softmax_scale", f"{s} (new VelocityKernel)",
             lambda: (0.8 * cr.kernels.VelocityKernel(a).compute_transition_matrix(softmax_scale=s, show_progress_bar=False)
                      + 0.2 * ck).compute_transition_matrix())
    k = (0.8 * vk + 0.2 * ck).compute_transition_matrix()
    g = cr.estimators.GPCCA(k)
    step("macrostates", "n_components", "20 (new Schur vectors)", lambda: g.compute_schur(n_components=20, method="brandts"))
    for n in [int(x) for x in n_states.split(",")]:
        step("macrostates", "n_states", f"{n} (first visit)", lambda: g.compute_macrostates(n_states=n, cluster_key="clusters"))
    names = [str(x) for x in g.macrostates.cat.categories]
    term = [t for t in terminal.split(",") if t in names] or names[:2]
    def states():
        g.set_terminal_states(term); g.compute_fate_probabilities(show_progress_bar=False)
    step("fates", "terminal_states", f"{len(term)} macrostates", states)
    step("fates", "view", "drivers", lambda: g.compute_lineage_drivers())
    step("fates", "view", "absorption times", lambda: g.compute_absorption_times(show_progress_bar=False))
    emit(S.result(tool=f"cellrank {cr.__version__}", rows=rows, terminal=term))


# ------------------------------------------------------------------------------------------------ driver
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=1, help="fresh fatebook processes (the table shows medians)")
    ap.add_argument("--no-cellrank", action="store_true", help="skip the CellRank 2.3.3 column")
    ap.add_argument("--worker", choices=["fatebook", "cellrank"], help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    add_threads_arg(ap)
    o = ap.parse_args()
    if o.worker == "fatebook": return fb_worker(*o.args)
    if o.worker == "cellrank": return cr_worker(*o.args)
    from _common import pancreas_pp_path
    h5ad = pancreas_pp_path()
    env = thread_env(o.threads)
    before = machine()
    runs = []
    for i in range(o.repeat):
        r = run_worker(FATEBOOK_PY, "bench_widgets.py", "--worker", "fatebook", h5ad, env=env)
        if "error" in r: sys.exit(r["error"])
        runs.append(r)
        print(f"fatebook run {i + 1}/{o.repeat}: {r['wall_seconds']:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    cr_res = None
    if not o.no_cellrank and CELLRANK_PY.exists():
        visited = [int(x["value"].split()[0]) for x in runs[0]["rows"] if x["control"] == "n_states" and "first" in x["value"]]
        cr_res = run_worker(CELLRANK_PY, "bench_widgets.py", "--worker", "cellrank", h5ad,
                            ",".join(map(str, visited[:3])), ",".join(runs[0]["terminal"]), env=env)
        if "error" in cr_res: print("CellRank run failed:", cr_res["error"][-500:]); cr_res = None
    after = machine()

    def med(vals):
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None
    n = len(runs[0]["rows"])
    out, payload_rows = [], []
    cr_by = {(r["tab"], r["control"], r["value"]): [r["seconds"]] for r in (cr_res or {}).get("rows", [])}
    for j in range(n):
        base = runs[0]["rows"][j]
        secs = med([run["rows"][j]["seconds"] for run in runs])
        first = med([run["rows"][j]["first_image"] for run in runs])
        comp = med([run["rows"][j]["compute"] for run in runs])
        goal = GOALS.get(base["control"]) if "forbidden" not in base["value"] else None
        crs = cr_by.get((base["tab"], base["control"], base["value"]))
        cpu = med([run["rows"][j].get("cpu") for run in runs])
        note = "" if goal is None else ("meets goal" if secs <= goal else f"goal {goal} s")
        if base["status"] == "error": note = "message: " + base["message"][:60]
        out.append([base["tab"], base["control"], base["value"], fmt_s(secs), fmt_s(cpu),
                    fmt_s(first) if first is not None and base["n_images"] > 1 else "", fmt_s(comp),
                    fmt_s(med(crs)) if crs else "", note])
        payload_rows.append(dict(base, seconds_median=secs, cpu_median=cpu, first_image_median=first,
                                 compute_median=comp, cellrank=crs))
    stages = {k: fmt_s(med([r["seconds"][k] for r in runs])) for k in runs[0]["seconds"]}
    head = (f"fatebook.widgets on pancreas ({runs[0]['n_obs']} cells), median of {len(runs)} fresh process(es); "
            f"threads={o.threads or 'default'}; load average before {before['loadavg']}, after {after['loadavg']} "
            f"({before['cpus']} CPUs, {before['date']})")
    txt = "\n".join([head, "", "one-off steps: " + ", ".join(f"{k} {v} s" for k, v in stages.items()), "",
                     table(out, ["tab", "control", "value", "figure (s)", "cpu (s)", "first image", "compute", "CellRank", ""]),
                     "", "CellRank: compute only, same change (" + ((cr_res or {}).get("tool") or "not run") + ")."])
    print(txt)
    path = save("widgets", dict(machine_before=before, machine_after=after, threads=o.threads, fatebook=runs,
                                cellrank=cr_res, rows=payload_rows), txt)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
