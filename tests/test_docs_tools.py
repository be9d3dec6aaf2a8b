"""The tools that keep the notebooks' stored outputs fit for the documentation site (issue 12): tools/exec_nbs.py
executes a notebook in place, tools/check_outputs.py rejects what a page must not show. Planted notebooks, small and
fast (one kernel start)."""
from __future__ import annotations
import json, sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import check_outputs, exec_nbs  # noqa: E402

VIEW = "application/vnd.jupyter.widget-view+json"
STATE = "application/vnd.jupyter.widget-state+json"


def _write(path: Path, cells: list[str], **meta) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in cells])
    nb.metadata.update(meta)
    nbformat.write(nb, path)
    return path


def test_exec_stores_no_widget_state(tmp_path):
    "A widget with a 1.2 MB image: no state in the metadata (a stale one is dropped), the static fallback kept."
    png = "b'\\x89PNG\\r\\n\\x1a\\n' + bytes(1_200_000)"
    nb = _write(tmp_path / "w.ipynb", [
        "import ipywidgets as w",
        "w.IntSlider(3)",
        "class Fig(w.VBox):\n    def _repr_mimebundle_(self, **kw):\n"
        "        d = super()._repr_mimebundle_(**kw); d['text/html'] = '<b>static figure</b>'; return d\n"
        f"Fig([w.Image(value={png})])",
        "print('done')"],
        widgets={STATE: {"state": {"old": {"model_name": "x", "state": {"v": "b" * 50_000}}}, "version_major": 2, "version_minor": 0}})
    assert exec_nbs.main([str(nb)]) == 0
    raw = nb.read_text()
    d = json.loads(raw)
    assert "widgets" not in d["metadata"] and len(raw) < 20_000, f"{len(raw)} bytes, metadata {list(d['metadata'])}"
    outs = [c["outputs"] for c in d["cells"]]
    assert not any(VIEW in (o.get("data") or {}) for os_ in outs for o in os_)
    text = lambda v: "".join(v) if isinstance(v, list) else v
    assert text(outs[1][0]["data"]["text/plain"]).startswith("IntSlider(")
    assert text(outs[2][0]["data"]["text/html"]) == "<b>static figure</b>"
    assert text(outs[3][0]["text"]) == "done\n"
    assert check_outputs.check_notebook(nb)[0] == []


def test_check_outputs_flags_widget_state_and_stateless_views(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("w")])
    nb.cells[0].outputs = [nbformat.v4.new_output("execute_result", data={
        VIEW: {"model_id": "m1", "version_major": 2, "version_minor": 0}, "text/plain": "IntSlider(value=3)"}, execution_count=1)]
    # a small state that holds the view's model: fine (JupyterLab can show it)
    nb.metadata["widgets"] = {STATE: {"state": {"m1": {"model_name": "IntSliderModel", "state": {"value": 3}}},
                                      "version_major": 2, "version_minor": 0}}
    nbformat.write(nb, tmp_path / "ok.ipynb")
    assert check_outputs.check_notebook(tmp_path / "ok.ipynb")[0] == []
    # 1.1 MB of state (an image blob) is flagged
    nb.metadata["widgets"][STATE]["state"]["m2"] = {"model_name": "ImageModel", "state": {"value": "A" * 1_100_000}}
    nbformat.write(nb, tmp_path / "big.ipynb")
    pr = check_outputs.check_notebook(tmp_path / "big.ipynb")[0]
    assert len(pr) == 1 and "KB of widget state" in pr[0] and "1074 KB" in pr[0], pr
    # a view whose model is not stored shows an error in JupyterLab
    del nb.metadata["widgets"]
    nbformat.write(nb, tmp_path / "view.ipynb")
    pr = check_outputs.check_notebook(tmp_path / "view.ipynb")[0]
    assert len(pr) == 1 and "no stored state" in pr[0], pr


STDERR = lambda t: nbformat.v4.new_output("stream", name="stderr", text=t)


@pytest.mark.parametrize("out,expect", [
    (STDERR("/tmp/ipykernel_81/123.py:1: UserWarning: careful\n  warnings.warn('careful')\n"), "warning on stderr"),
    (nbformat.v4.new_output("stream", name="stdout", text="wrote /work/main/nbs/x.h5ad\n"), "machine path"),
    (STDERR("walks:   5%|#####     | 5/100 [00:01<00:19, 4.9it/s]"), "progress bar"),
    (nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="division by zero", traceback=[]), "error output"),
])
def test_check_outputs_flags_each_kind(tmp_path, out, expect):
    "Each kind of fault, stored as a kernel stores it, is a problem naming the cell; fatebook's log lines are not."
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x"), nbformat.v4.new_code_cell("y")])
    nb.cells[0].outputs = [STDERR("WARNING: Adding `adata.obsm['T_fwd']`\n")]
    nb.cells[1].outputs = [out]
    nbformat.write(nb, tmp_path / "x.ipynb")
    pr = check_outputs.check_notebook(tmp_path / "x.ipynb")[0]
    assert len(pr) >= 1 and all(p.startswith("cell 1:") for p in pr) and expect in pr[0], pr
