"""The papermill report: executed on simulated data and on the dentate-gyrus fixture with several parameter sets,
bad parameters caught with one clear message, and no complete-looking folder after a failure or an interrupt."""
import json, os, subprocess, sys
from pathlib import Path

import anndata as ad
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from browser import chrome, static_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("fatebook"))
ENV = {**os.environ, "MPLBACKEND": "agg"}


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr(monkeypatch):
    "fatebook's log handler writes to the stderr of its import time; library calls in a test should write to the test's."
    import logging
    from fatebook.core import logger
    monkeypatch.setattr(logger, "handlers", [logging.StreamHandler(sys.stderr)])
pytestmark = pytest.mark.report


def report(*args, timeout=1200):
    return subprocess.run([EXE, "report", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=ENV)


def report_here(capsys, *args):
    "`fatebook report ARGS` in this process: (exit code, stdout, stderr)."
    from fatebook.cli import main
    capsys.readouterr()
    try: code = main(["report", *map(str, args)])
    except SystemExit as e: code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def no_folder_left(parent: Path, name: str):
    return not (parent / name).exists() and not any(p.name.startswith(f".{name}.") for p in parent.iterdir())


def check_folder(out: Path, states):
    "The report's files exist and hold the expected states (HTML, summary, result AnnData)."
    for f in ("report.ipynb", "report.html", "fatebook_result.h5ad", "summary.json", "fate_probabilities.csv", "drivers.csv"):
        assert (out / f).exists(), f
    html = (out / "report.html").read_text()
    for h in ("Fate report", "Spectrum", "Macrostates and coarse-grained transitions", "Fate probabilities",
              "Absorption times", "Lineage drivers", "what was chosen automatically", "Provenance", "Input SHA-256"):
        assert h in html, h
    assert html.count("data:image/png;base64") >= 8          # the figures are in the page
    for s in states: assert s in html, s
    a = ad.read_h5ad(out / "fatebook_result.h5ad")
    return json.loads((out / "summary.json").read_text()), a


def test_template_copy_in_sync():
    """The shipped template is the notebook in nbs/templates, and its parameters cell is generated from
    fatebook.reports.PARAMS (tools/sync_templates.py does both)."""
    assert (REPO / "nbs/templates/fate_report.ipynb").read_bytes() == (REPO / "fatebook/templates/fate_report.ipynb").read_bytes()
    r = subprocess.run([sys.executable, str(REPO / "tools/sync_templates.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_report_simulated_auto(tmp_path):
    "Automatic choices on simulated data: the true fates are the terminal states; the HTML hides code until asked."
    out = tmp_path / "sim"
    r = report("-p", "n_cells", 600, "-p", "n_genes", 120, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    s, a = check_folder(out, ["Progenitor"])
    assert s["status"] == "ok" and s["truth"]["all_true_terminal_found"], s.get("truth")
    assert s["initial_states"] == ["Progenitor"]
    html = (out / "report.html").read_text()                           # simulated: the simulation's own parameters shown
    assert ">n_cells</th>" in html and ">n_states</th>" in html and ">out</th>" not in html   # (out: the temporary '.')
    assert list(a.obs["fb_term_states_fwd"].cat.categories) == s["terminal_states"]
    with static_server(out) as url, chrome(width=1100, height=1400) as drv:
        drv.get(f"{url}/report.html")
        visible = "return Array.from(document.querySelectorAll('.jp-CodeCell .jp-Cell-inputWrapper')).filter(e => e.offsetParent !== null).length"
        assert drv.execute_script(visible) == 0                       # code hidden by default
        prompts = ("return Array.from(document.querySelectorAll('.jp-OutputPrompt')).filter(e => e.offsetParent !== null"
                   " && getComputedStyle(e).visibility !== 'hidden' && e.textContent.trim()).length")
        assert drv.execute_script(prompts) == 0                       # ... and the 'Out[4]:' beside outputs (a newcomer)
        drv.save_screenshot(str(tmp_path / "report_top.png"))
        drv.find_element("id", "fb-code-toggle").click()
        assert drv.execute_script(visible) > 5                        # ... shown on request
    assert (tmp_path / "report_top.png").stat().st_size > 20_000


def test_report_dentate_gyrus_by_name(tmp_path, dentate_gyrus_path):
    out = tmp_path / "dg"
    r = report("--adata", dentate_gyrus_path(200), "-p", "terminal_states", '["Granule mature", "Astrocytes"]',
               "-p", "initial_states", "Neuroblast", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()                                      # no kernel chatter: one line per section
    assert all(l.startswith("[report] ") for l in lines) and "Traceback" not in r.stderr, r.stderr
    for sec in ("kernel start and imports", "Parameters", "Spectrum", "Lineage drivers", "Provenance", "HTML"):
        assert any(l.startswith(f"[report] {sec} (") for l in lines), (sec, r.stderr)
    s, a = check_folder(out, ["Granule mature", "Astrocytes", "Neuroblast"])
    assert (s["status"], s["terminal_states"], s["initial_states"]) == ("ok", ["Granule mature", "Astrocytes"], ["Neuroblast"])
    assert a.n_vars == 530 and not s["preprocessed_here"]
    assert list(a.uns["fb_fate_probs_fwd_names"]) == ["Granule mature", "Astrocytes"]
    html = (out / "report.html").read_text()                           # real input: no simulation-only parameters (a newcomer)
    assert ">n_states</th>" in html and not any(f">{p}</th>" in html for p in ("n_cells", "n_genes", "n_fates", "out"))


def test_report_dentate_gyrus_auto_says_degenerate(tmp_path, dentate_gyrus_path, capsys):
    "All automatic on 200 cells: no sound answer exists; the report says so on top, the command exits 3."
    out = tmp_path / "dga"
    code, _, err = report_here(capsys, "--adata", dentate_gyrus_path(200), "-p", "max_n_states", 6, "--out", out)
    assert code == 3, (code, err[-3000:])
    assert "THE RESULT IS DEGENERATE" in err
    html = (out / "report.html").read_text()
    assert 'id="fb-banner"' in html and "THE RESULT IS DEGENERATE" in html
    assert json.loads((out / "summary.json").read_text())["status"] == "degenerate"


@pytest.mark.parametrize("args, needle, fix", [
    (["-p", "terminal_states", '["Alpha"]'], "['Alpha'] is not in adata.obs['clusters']", "valid names"),
    (["-p", "terminal_states", "Granule mature,Alpha"], "['Alpha'] is not in adata.obs['clusters']", "valid names"),
    (["-p", "cluster_key", "cluster"], "not a column of adata.obs", "Set cluster_key"),
    (["-p", "n_states", '"four"'], "n_states", "Example: n_states=4"),
    (["-p", "n_states", "true"], "n_states", "Example: n_states=4"),
    (["-p", "n_stats", "4"], "unknown parameter(s) ['n_stats']", "did you mean ['n_states']"),
    (["-p", "backward", "maybe"], "backward must be True or False", "'maybe'"),
    (["-p", "adata", "x.h5ad"], "give `adata` as --adata", ""),
    (["--timeout", "0"], "timeout=0 is out of range", ">= 1"),
    (["--adata", "{tmp}/missing.h5ad"], "does not exist", "Check the path"),
    (["--out", "{tmp}/mine"], "is not a fatebook output", "Choose a new folder"),
])
def test_report_bad_parameters(tmp_path, dentate_gyrus_path, capsys, args, needle, fix):
    "Caught before a kernel starts: one line naming the problem and the fix, exit 2, no folder."
    (tmp_path / "mine").mkdir(); (tmp_path / "mine" / "data.csv").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--adata" not in args: args = ["--adata", dentate_gyrus_path(50), *args]
    if "--out" not in args: args += ["--out", tmp_path / "rep"]
    code, _, err = report_here(capsys, *args)
    assert code == 2, (code, err[-2000:])
    err = err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("fatebook report: error:") and needle in err and fix in err, err
    assert no_folder_left(tmp_path, "rep")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["data.csv"]


def test_template_validates_its_parameters(tmp_path, dentate_gyrus_path):
    "papermill on the template directly: the first executed cell stops with the same clear message."
    import papermill as pm
    from fatebook.reports import template_path
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(template_path()), str(tmp_path / "out.ipynb"), progress_bar=False, cwd=str(tmp_path),
                            parameters=dict(adata=str(dentate_gyrus_path(200)), terminal_states=["Beta"], out=str(tmp_path / "o")))
    assert e.value.ename == "ParameterError" and "['Beta'] is not in adata.obs['clusters']" in e.value.evalue
    assert e.value.exec_count <= 4     # parameters, injected parameters, imports, then this check: before any heavy work
    assert not (tmp_path / "o").exists()


def test_failing_notebook_is_a_fault(tmp_path):
    """A notebook that fails for a reason other than a parameter: `ReportError` naming the section and the error, with
    the notebook's traceback, `user_error` False (the command exits 1, not 2), and no folder."""
    import nbformat
    from fatebook.reports import ReportError, run_report
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("adata = None\nout = '.'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_markdown_cell("## Boom"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(nb, tmp_path / "t.ipynb")
    with pytest.raises(ReportError) as e:
        run_report(out=tmp_path / "rep", template=tmp_path / "t.ipynb")
    assert "section 'Boom': ValueError: boom" in str(e.value) and not e.value.user_error, str(e.value)
    assert "raise ValueError('boom')" in e.value.traceback
    assert no_folder_left(tmp_path, "rep")
