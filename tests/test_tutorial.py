"""The pancreas tutorial (`nbs/tutorials/pancreas.ipynb`) executed end to end, and its biology checked.

The tutorial folder carries `.notest`, so nbdev-test skips it; this test keeps it executed and true instead. It runs a
*copy* of the committed notebook with nbclient (the committed file is never rewritten), in a fresh kernel, with
`FATEBOOK_DATA_DIR` from the environment (tools/test.sh and conftest set it to the shared data), and fails if any
cell raises -- the notebook's own check cells assert the biology. Then one extra cell, appended by this test and not
part of the notebook, reads the final estimator and writes the quantities below to JSON, and they are asserted here
independently of what the notebook prints:

- Gcg is the top driver of the Alpha lineage (CellRank's tutorial reports r = 0.86 on the full gene set);
- Beta is the most likely fate of the endocrine progenitors (Ngn3 low EP, Ngn3 high EP, Pre-endocrine) at E15.5;
- each terminal cluster (Alpha, Beta, Epsilon, Delta, where a terminal state of that name exists) has its own fate
  as the largest mean fate probability -- except, on this 2,000-gene file, the Alpha cells (a strict xfail whose
  reason the tutorial explains with numbers);
- known Beta-cell markers present in the 2,000-gene file (Ins1, Ins2, Pdx1, Nkx6-1, Pax4, Mafb) rank among the top
  Beta drivers;
- the backward process (initial states) starts in the Ngn3 low EP progenitors;
- the seed's 3-state step (`set_terminal_states_from_macrostates()` with all three macrostates) warns that the
  progenitor macrostate Ngn3 low EP, the most upstream one, is set as terminal -- the tutorial shows that warning on
  purpose before it chooses the terminal states properly;
- the terminal states the tutorial chooses are made of the cell type they are named after (CellRank's optimiser,
  `optimizer='nelder-mead'`, makes the same choice: 5 states).

The data file holds 2,000 of the original 27,998 genes (see ../shared/data/README.md).
"""
from __future__ import annotations
import json, os, time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NB = REPO / "nbs" / "tutorials" / "pancreas.ipynb"
TIME_BUDGET = int(os.environ.get("FATEBOOK_TUTORIAL_TIMEOUT", "2400"))  # seconds one cell may take (recover_dynamics: 3.8 min at load 2-3, 7.3 min at load 5-6, 19 min at load 15-20)

PROGENITORS = ["Ngn3 low EP", "Ngn3 high EP", "Pre-endocrine"]
BETA_MARKERS = ["Ins1", "Ins2", "Pdx1", "Nkx6-1", "Pax4", "Mafb"]
TOP_BETA = 50  # "among the top Beta drivers": the top 50 of ~1,000 genes (the top 5 %)

# Appended to the executed copy only: the tutorial's estimator with the endocrine terminal states is `g`, the
# backward one is `g_bwd` (see the notebook).
_PROBE = r'''
import json as _json, numpy as _np
_B = _np.asarray(g.fate_probabilities, dtype=float); _names = list(g.fate_probabilities.names)
_cl = adata.obs["clusters"].astype(str).to_numpy()
_means = {c: dict(zip(_names, _np.nanmean(_B[_cl == c], axis=0).round(4).tolist())) for c in sorted(set(_cl))}
_prog = _np.isin(_cl, %(prog)r)
_d = g.compute_lineage_drivers(lineages=["Alpha", "Beta"], return_drivers=True)
_alpha = _d.sort_values("Alpha_corr", ascending=False); _beta = _d.sort_values("Beta_corr", ascending=False)
_init = g_bwd.terminal_states
_stat = g_bwd.coarse_stationary_distribution
_res = dict(
    lineages=_names, cluster_means=_means,
    progenitor_mean=dict(zip(_names, _np.nanmean(_B[_prog], axis=0).round(4).tolist())),
    alpha_top=_alpha.index[:5].tolist(), gcg_r=float(_d.loc["Gcg", "Alpha_corr"]),
    beta_rank={m: int(list(_beta.index).index(m)) + 1 for m in %(markers)r if m in _beta.index},
    n_genes=int(adata.n_vars),
    initial_states=[str(c) for c in _init.cat.categories],
    backward_stationary_argmax=str(_stat.idxmax()),
    cflare_alpha_cells=dict(zip(list(c.fate_probabilities.names),
                                _np.nanmean(_np.asarray(c.fate_probabilities)[_cl == "Alpha"], axis=0).round(4).tolist())),
    initial_clusters=adata.obs.loc[_init.notna().to_numpy(), "clusters"].astype(str).value_counts().to_dict(),
    terminal_clusters={str(s): adata.obs.loc[g.terminal_states.eq(s).to_numpy(), "clusters"].astype(str).value_counts().to_dict()
                       for s in g.terminal_states.cat.categories},
)
with open(%(out)r, "w") as _fh: _json.dump(_res, _fh)
import anndata as _ad, pandas as _pd   # the same kernel inputs and terminal cells, for CellRank 2.3.3
_x = _ad.AnnData(X=adata.X, obs=adata.obs[["clusters"]].copy(), var=adata.var[["velocity_genes"]].copy(),
                 layers={k: _np.asarray(adata.layers[k]) for k in ("Ms", "velocity")},
                 obsp={k: adata.obsp[k] for k in ("connectivities", "distances")})
_x.obs["terminal"] = _pd.Categorical(g.terminal_states.astype(object).to_numpy())
_x.write_h5ad(%(h5ad)r)
'''


def _data_dir() -> Path | None:
    env = os.environ.get("FATEBOOK_DATA_DIR")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    return d if (d / "pancreas_2531x2000.h5ad").exists() else None


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    "Execute a copy of the tutorial; returns (executed notebook, probe results, seconds)."
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    data = _data_dir()
    if data is None:
        pytest.skip("pancreas_2531x2000.h5ad not found: set FATEBOOK_DATA_DIR (see ../shared/data/README.md)")
    tmp = tmp_path_factory.mktemp("tutorial")
    out, h5ad = tmp / "probe.json", tmp / "kernel_inputs.h5ad"
    nb = nbformat.read(NB, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE % dict(prog=PROGENITORS, markers=BETA_MARKERS, out=str(out), h5ad=str(h5ad))))
    env_before = os.environ.get("FATEBOOK_DATA_DIR")
    os.environ["FATEBOOK_DATA_DIR"] = str(data.resolve())   # the kernel inherits it
    client = nbclient.NotebookClient(nb, timeout=TIME_BUDGET, kernel_name="python3", store_widget_state=False,
                                    resources={"metadata": {"path": str(tmp)}})
    t0 = time.perf_counter()
    try:
        client.execute()   # raises CellExecutionError naming the failing cell
    finally:
        if env_before is None: os.environ.pop("FATEBOOK_DATA_DIR", None)
        else: os.environ["FATEBOOK_DATA_DIR"] = env_before
    seconds = time.perf_counter() - t0
    nbformat.write(nb, tmp / "pancreas_executed.ipynb")   # kept in pytest's tmp folder for a look after a failure
    return nb, json.loads(out.read_text()), seconds, h5ad


@pytest.mark.slow
def test_tutorial_runs_clean(tutorial, tmp_path):
    """Every cell ran; the outputs pass the project's stored-output check (tools/check_outputs.py: no tracebacks,
    Python warnings on stderr, progress bars, machine paths or huge images) and hold no DeprecationWarning."""
    import importlib.util, nbformat
    nb, _, seconds, _ = tutorial
    print(f"tutorial executed in {seconds:.0f} s")
    nb = nbformat.from_dict(dict(nb, cells=nb.cells[:-1]))   # without this test's probe cell
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)
    bad = []
    for i, c in enumerate(nb.cells):
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            text = o.get("text", "") if o.get("output_type") == "stream" else str(o.get("data", {}).get("text/plain", ""))
            for s in (str(REPO), "DeprecationWarning", "FutureWarning"):
                if s in text: bad.append((i, s, text[:200]))
    checker = REPO / "tools" / "check_outputs.py"
    if checker.exists():
        spec = importlib.util.spec_from_file_location("_check_outputs", checker)
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        bad += mod.check_notebook(path)[0]
    assert not bad, f"unclean outputs: {bad}"


@pytest.mark.slow
def test_gcg_top_alpha_driver(tutorial):
    _, r, _, _ = tutorial
    assert r["alpha_top"][0] == "Gcg", f"top Alpha drivers {r['alpha_top']}"
    assert r["gcg_r"] > 0.7, r["gcg_r"]


@pytest.mark.slow
def test_beta_dominant_fate_of_progenitors(tutorial):
    _, r, _, _ = tutorial
    m = r["progenitor_mean"]
    assert max(m, key=m.get) == "Beta", m
    for c in PROGENITORS:   # also cluster by cluster
        cm = r["cluster_means"][c]
        assert max(cm, key=cm.get) == "Beta", (c, cm)


@pytest.mark.slow
def test_endocrine_terminal_states(tutorial):
    _, r, _, _ = tutorial
    assert {"Alpha", "Beta", "Epsilon"} <= set(r["lineages"]), r["lineages"]


ALPHA_REASON = ("with the 2,000-gene file, most Alpha cells' velocities point towards Beta (Beta-program genes Nnat, Dlk1, "
                "Ins2 push; Gcg is no velocity gene) rather than towards GPCCA's high-glucagon Alpha terminal cells, so "
                "Alpha cells reach Beta first; CellRank 2.3.3 gives the same numbers. Explained in the tutorial; strict, "
                "so that a change shows up here.")


@pytest.mark.slow
@pytest.mark.parametrize("cluster", ["Beta", "Epsilon", "Delta",
                                     pytest.param("Alpha", marks=pytest.mark.xfail(strict=True, reason=ALPHA_REASON))])
def test_terminal_cluster_chooses_its_own_fate(tutorial, cluster):
    _, r, _, _ = tutorial
    if cluster not in r["lineages"]:
        pytest.skip(f"no {cluster} terminal state in the tutorial (lineages {r['lineages']})")
    cm = r["cluster_means"][cluster]
    assert max(cm, key=cm.get) == cluster, (cluster, cm)


@pytest.mark.slow
def test_alpha_cells_choose_alpha_with_cflares_terminal_cells(tutorial):
    "The tutorial's statement that CFLARE's Alpha cells (nearer the cluster's middle) give Alpha cells an Alpha fate."
    _, r, _, _ = tutorial
    m = r["cflare_alpha_cells"]
    assert max(m, key=m.get) == "Alpha", m


@pytest.mark.slow
def test_beta_markers_among_top_beta_drivers(tutorial):
    _, r, _, _ = tutorial
    ranks = r["beta_rank"]
    assert len(ranks) >= 3, ranks   # the file holds Ins1, Ins2, Pdx1, Nkx6-1, Pax4 after scVelo's gene filter
    top = {m: k for m, k in ranks.items() if k <= TOP_BETA}
    assert len(top) >= len(ranks) // 2 + 1, f"Beta marker ranks among {r['n_genes']} genes: {ranks}"


@pytest.mark.slow
def test_initial_state_is_the_progenitors(tutorial):
    _, r, _, _ = tutorial
    assert r["backward_stationary_argmax"] == "Ngn3 low EP", r
    counts = r["initial_clusters"]
    assert counts and max(counts, key=counts.get) == "Ngn3 low EP", counts


@pytest.mark.slow
def test_seed_three_state_step_warns_about_the_progenitors(tutorial):
    "The seed's `set_terminal_states_from_macrostates()` on Ngn3 low EP, Epsilon, Beta: the library's warning is shown."
    nb, _, _, _ = tutorial
    cells = [c for c in nb.cells if c.cell_type == "code"
             and c.source.lstrip().startswith("g.set_terminal_states_from_macrostates()")]
    assert len(cells) == 1, "the seed's call with all macrostates is expected in exactly one cell"
    text = "".join(o.get("text", "") for o in cells[0].outputs if o.get("output_type") == "stream")
    assert "WARNING: Macrostate 'Ngn3 low EP' is set as a terminal state" in text, text[:1000]
    assert "most upstream macrostate" in text, text[:1000]
    assert "Terminal states: Ngn3 low EP (30 cells)" in text, text[:1000]   # the step still runs, as the seed wrote it


@pytest.mark.slow
def test_terminal_states_are_made_of_their_cell_type(tutorial):
    "Every terminal state the tutorial keeps holds only cells of the cluster it is named after."
    _, r, _, _ = tutorial
    for state, counts in r["terminal_clusters"].items():
        assert set(counts) == {state}, (state, counts)


_CELLRANK = r"""
import sys, json, warnings
warnings.simplefilter("ignore")
import numpy as np, anndata as ad, cellrank as cr
a = ad.read_h5ad(sys.argv[1])
k = 0.8 * cr.kernels.VelocityKernel(a).compute_transition_matrix() + 0.2 * cr.kernels.ConnectivityKernel(a).compute_transition_matrix()
g = cr.estimators.GPCCA(k)
g.set_terminal_states(a.obs["terminal"])
g.compute_fate_probabilities()
B = np.asarray(g.fate_probabilities); names = list(g.fate_probabilities.names)
cl = a.obs["clusters"].astype(str).to_numpy()
print(json.dumps({c: dict(zip(names, B[cl == c].mean(axis=0).tolist())) for c in sorted(set(cl))}))
"""


@pytest.mark.slow
@pytest.mark.parity
def test_alpha_result_matches_cellrank(tutorial, cellrank_python):
    "The tutorial's statement that CellRank 2.3.3 gives the same fates on the same velocities and terminal cells."
    import subprocess
    _, r, _, h5ad = tutorial
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"): env.pop(k, None)
    p = subprocess.run([str(cellrank_python), "-c", _CELLRANK, str(h5ad)], capture_output=True, text=True,
                       timeout=900, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    ref = json.loads(p.stdout.strip().splitlines()[-1])
    for c, m in r["cluster_means"].items():
        for lin, v in m.items():
            assert abs(v - ref[c][lin]) < 2e-3, (c, lin, v, ref[c][lin])
