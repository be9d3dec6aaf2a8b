"""`fatebook run` as a user runs it: the README's main job, the issue's failing examples, one-line errors, exit codes.

The pancreas file holds 2,000 of the original 27,998 genes (see ../shared/data/README.md)."""
import json, os, subprocess, sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

EXE = str(Path(sys.executable).with_name("fatebook"))
ENV = {**os.environ, "MPLBACKEND": "agg"}
PROGENITORS = {"Ngn3 low EP", "Ngn3 high EP", "Pre-endocrine"}


def fatebook(*args, timeout=1200):
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


def base(name):  # 'Ngn3 low EP_1' -> 'Ngn3 low EP'
    head, _, tail = name.rpartition("_")
    return head if head and tail.isdigit() else name


def no_folder_left(parent: Path, name: str):
    "Nothing that looks like an output: neither the folder nor a partial one."
    return not (parent / name).exists() and not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def test_fatebook_run_recovers_true_fates(tmp_path):
    "The README's main job (simulated data, smaller): true fates recovered; --quiet prints nothing on stderr."
    out = tmp_path / "res"
    r = fatebook("run", "--out", out, "--n-cells", 600, "--n-genes", 120, "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == "", r.stderr[-2000:]            # quiet is quiet: no warnings, no log lines, no bars
    assert "true fate A" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "ok" and s["truth"]["all_true_terminal_found"], s["truth"]
    for f in ("A", "B"):
        assert s["truth"][f"auc_{f}"]["auc"] > 0.95, s["truth"]
    assert s["initial_states"] == ["Progenitor"], s["initial_states"]
    fp = pd.read_csv(out / "fate_probabilities.csv", index_col=0)
    np.testing.assert_allclose(fp.sum(1), 1, atol=1e-6)
    assert (out / "drivers.csv").exists() and (out / "fatebook_result.h5ad").exists()
    figs = {p.name for p in (out / "figures").glob("*.png")}
    assert {"spectrum.png", "coarse_T.png", "fate_probabilities.png", "projection.png"} <= figs, figs
    # a second run into the same folder replaces the previous fatebook output (the README job is re-runnable)
    r2 = fatebook("run", "--out", out, "--n-cells", 600, "--n-genes", 120, "--quiet", "--no-figures")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert not (out / "figures").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["res"]          # no partial or old folder left


def test_preprocessed_input_is_left_alone(tmp_path, dentate_gyrus_path):
    "Issue 10: data with Ms, velocity and a kNN graph was silently re-preprocessed (530 -> 406 genes, UMAP overwritten)."
    src = dentate_gyrus_path(200)
    out = tmp_path / "dg"
    r = fatebook("run", "--adata", src, "--terminal-states", "Granule mature,Astrocytes", "--initial-states", "Neuroblast",
                 "--no-figures", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped: the data already has Ms, velocity and a kNN graph" in r.stderr
    assert "Traceback" not in r.stderr and "Adding `adata" not in r.stderr
    steps = [l for l in r.stderr.splitlines() if l.startswith("[")]
    assert [l.split("]")[0][1:] for l in steps] == ["data", "preprocess", "kernel", "schur", "states", "fates", "drivers", "write"]
    lines = [l for l in r.stderr.splitlines() if l.strip() and "%|" not in l]   # (a progress bar may leave its last state)
    assert len(lines) == 8, r.stderr                                       # one line per step
    a_in, a_out = ad.read_h5ad(src), ad.read_h5ad(out / "fatebook_result.h5ad")
    assert a_out.n_vars == a_in.n_vars == 530
    np.testing.assert_array_equal(a_out.obsm["X_umap"], a_in.obsm["X_umap"])
    s = json.loads((out / "summary.json").read_text())
    assert (s["status"], s["terminal_states"], s["initial_states"], s["preprocessed_here"]) == \
        ("ok", ["Granule mature", "Astrocytes"], ["Neuroblast"], False)


def test_dentate_gyrus_n_states_5_is_no_traceback(tmp_path, dentate_gyrus_path):
    """Issue 10: `--preprocessed --n-states 5` died with `ValueError: 12 cell(s) would be both initial and terminal`.
    On 200 cells no macrostate is stable enough to be terminal: the run must say so prominently and exit 3."""
    r = fatebook("run", "--adata", dentate_gyrus_path(200), "--preprocessed", "--n-states", 5, "--no-figures",
                 "--out", tmp_path / "dg5")
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert "THE RESULT IS DEGENERATE" in r.stderr and "no terminal state" in r.stderr
    assert "terminal_states=" in r.stderr          # the fix: name the states
    s = json.loads((tmp_path / "dg5" / "summary.json").read_text())
    assert s["status"] == "degenerate" and s["problems"]


@pytest.mark.parametrize("args, needle, fix", [
    (["--adata", "{tmp}/missing.h5ad"], "does not exist", "Check the path"),
    (["--adata", "{tmp}/text.h5ad"], "is not an h5ad file", "write_h5ad"),
    (["--adata", "{dg}", "--cluster-key", "cluster"], "not a column of adata.obs", "Set cluster_key"),
    (["--adata", "{dg}", "--terminal-states", "Granule"], "not in adata.obs['clusters']", "valid names"),
    (["--adata", "{dg}", "--n-states", "four"], "n_states", "Example: n_states=4"),
    (["--adata", "{dg}", "--n-states", "4.5"], "n_states", "whole number"),
    (["--adata", "{dg}", "--weight-velocity", "0.5"], "must sum to 1", "weight_connectivity"),
    (["--adata", "{dg}", "--velocity-mode", "dynamic"], "velocity_mode", "Did you mean 'dynamical'"),
])
def test_user_errors_are_one_line(tmp_path, dentate_gyrus_path, args, needle, fix):
    "Bad input (issue 13's catalogue too): one line naming the problem and the fix, exit 2, no traceback, nothing written."
    (tmp_path / "text.h5ad").write_text("cell,gene\nc1,3\n")
    args = [a.format(tmp=tmp_path, dg=dentate_gyrus_path(200)) for a in args]
    r = fatebook("run", *args, "--out", tmp_path / "res")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("fatebook run: error:") and needle in err and fix in err, err
    assert no_folder_left(tmp_path, "res")


def test_version_and_help():
    import fatebook
    r = subprocess.run([EXE, "--version"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stdout.strip() == f"fatebook {fatebook.__version__}"
    from fatebook.reports import PARAMS
    h = subprocess.run([EXE, "run", "--help"], capture_output=True, text=True, env=ENV).stdout
    for p in PARAMS:
        opt = "--preprocess" if p.name == "preprocess" else "--" + p.name.replace("_", "-")
        assert opt in h, opt
    for d in ("(default: auto)", "(default: 0.96)", "(default: 0.8)", "(default: results)", "(default: clusters)"):
        assert d in " ".join(h.split()), d
    h2 = " ".join(subprocess.run([EXE, "report", "--help"], capture_output=True, text=True, env=ENV).stdout.split())
    for opt in ("--adata", "--out", "-p NAME VALUE", "--show-code", "--quiet", "(default: report)"):
        assert opt in h2, opt


@pytest.mark.slow
def test_raw_pancreas_automatic_run_is_sound(tmp_path, data_dir):
    """Issue 10: on the raw pancreas file (2,000 of the original genes) the automatic run gave initial = Alpha, one
    terminal state Beta and every fate = 1 (also with --n-states 4 and 12). Now: an initial state among the progenitor
    clusters and at least Alpha and Beta among the terminal states, for 'auto', 4 and 12 macrostates."""
    out = tmp_path / "panc"
    r = fatebook("run", "--adata", data_dir / "pancreas_2531x2000.h5ad", "--no-figures", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["preprocessed_here"] and s["status"] == "ok", s["problems"]
    assert {base(x) for x in s["initial_states"]} <= PROGENITORS and s["initial_states"], s["initial_states"]
    assert {"Alpha", "Beta"} <= {base(x) for x in s["terminal_states"]}, s["terminal_states"]
    fp = np.asarray(pd.read_csv(out / "fate_probabilities.csv", index_col=0))
    assert fp.shape[1] >= 2 and (fp.max(1) < 0.99).mean() > 0.1        # not 'every fate = 1'
    # the other two runs, on the preprocessed result (detected: not preprocessed again)
    for n in (4, 12):
        o = tmp_path / f"panc{n}"
        r = fatebook("run", "--adata", out / "fatebook_result.h5ad", "--n-states", n, "--no-figures", "--out", o)
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads((o / "summary.json").read_text())
        assert not s["preprocessed_here"]
        assert {base(x) for x in s["initial_states"]} <= PROGENITORS and s["initial_states"], (n, s["initial_states"])
        assert {"Alpha", "Beta"} <= {base(x) for x in s["terminal_states"]}, (n, s["terminal_states"])

