"""The tools around the documentation site (issue 12), on planted notebooks, small and fast (one kernel start):
tools/exec_nbs.py executes a notebook in place, tools/check_outputs.py rejects what a page must not show, and
tools/docs.py stops on a notebook it cannot publish with one line naming notebook, cell and fix (before nbdev's
processing, whose tracebacks name no notebook), never replaces a folder that is not a site, wraps signatures and
keeps the prose of a title cell."""
from __future__ import annotations
import json, re, sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import check_outputs, docs, exec_nbs  # noqa: E402

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


def _nb_json(cells) -> dict:
    return {"cells": [{"cell_type": t, "metadata": {}, "source": src,
                       **({"outputs": [], "execution_count": None} if t == "code" else {})} for t, src in cells],
            "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_docs_preflight_names_notebook_cell_and_fix(tmp_path, monkeypatch, capsys):
    "Each kind of notebook nbdev's processing fails on (or silently drops from the page) stops the build clearly."
    nbs = tmp_path / "nbs"; (nbs / "_scratch").mkdir(parents=True)
    good = _nb_json([("code", "#| default_exp good"), ("markdown", "# Good\n\n> fine"),
                     ("code", "#| export\ndef f(x): return x"), ("code", "%time f(1)\n!ls\nf?"), ("code", "%%bash\necho hi"),
                     ("code", "#| eval: false\nnot python at all (")])
    (nbs / "00_good.ipynb").write_text(json.dumps(good))
    (nbs / "01_syntax.ipynb").write_text(json.dumps(_nb_json([("code", "#| default_exp s"), ("code", "#| export\ndef g(x:\n    return x")])))
    (nbs / "02_noexp.ipynb").write_text(json.dumps(_nb_json([("markdown", "# No module"), ("code", "#| export\ndef h(): pass"),
                                                             ("code", "#| export other\ndef k(): pass")])))
    (nbs / "03_surrogate.ipynb").write_text(json.dumps(_nb_json([("code", "print(x)")])).replace('"outputs": []',
        '"outputs": [{"name": "stdout", "output_type": "stream", "text": "caf\\udce9"}]'))
    (nbs / "04_latin.ipynb").write_bytes(json.dumps(_nb_json([("markdown", "# caf\u00e9")]), ensure_ascii=False).encode("latin-1"))
    (nbs / "05_mixed.ipynb").write_text(json.dumps(_nb_json([("code", "import numpy as np\nx = np.zeros(3)")])))
    (nbs / "06_trunc.ipynb").write_text(json.dumps(_nb_json([("markdown", "# T")]))[:-9])
    (nbs / "_scratch" / "broken.ipynb").write_text("{")          # not processed by nbdev: not checked
    got = docs.preflight(nbs)
    print("\n".join(got))
    expect = {"01_syntax": "cell 1: not valid Python: SyntaxError", "02_noexp": "cell 1: `#| export` but the notebook has no `#| default_exp",
              "03_surrogate": "cell 0: its outputs hold text that is not valid Unicode", "04_latin": "not UTF-8: byte 0xe9 on line 1",
              "05_mixed": "cell 0 mixes imports", "06_trunc": "not valid notebook JSON"}
    assert len(got) == len(expect), got
    for name, msg in expect.items():
        assert any(g.startswith(f"nbs/{name}.ipynb: ") and msg in g for g in got), (name, got)
    # the build stops on them before any processing, naming each
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    monkeypatch.setattr(docs, "nbdev_process", lambda **k: pytest.fail("processing started"))
    with pytest.raises(SystemExit, match="6 problem"):
        docs.main(["--out", str(tmp_path / "site"), "--build", str(tmp_path / "build")])
    assert "nbs/01_syntax.ipynb: cell 1: not valid Python" in capsys.readouterr().out


def test_docs_refuses_to_replace_what_is_not_a_site(tmp_path):
    "--out is replaced by the new site: never the repository, the notebooks or a folder of other files."
    for bad in [docs.ROOT, docs.ROOT / "nbs", docs.ROOT.parent]:
        with pytest.raises(SystemExit, match="would replace the repository"): docs.check_out(bad, tmp_path / "b")
    mine = tmp_path / "results"; mine.mkdir(); (mine / "analysis.h5ad").write_text("precious")
    with pytest.raises(SystemExit, match="not a site built by this tool"): docs.check_out(mine, tmp_path / "b")
    old = tmp_path / "old_site"; old.mkdir(); (old / ".buildinfo").write_text("x")
    docs.check_out(old, tmp_path / "b"); docs.check_out(tmp_path / "new", tmp_path / "b"); (tmp_path / "empty").mkdir()
    docs.check_out(tmp_path / "empty", tmp_path / "b")
    assert (mine / "analysis.h5ad").read_text() == "precious"


def test_signature_wrapping_keeps_code():
    sig = ("def f(\n    T, # row-stochastic transition matrix (n x n), sparse or dense, and a comment long enough to wrap\n"
           "    color:str='#ff0000', # a default holding a hash sign, then a comment that has to be wrapped as well\n"
           "    x:int=1, # short\n)->int:")
    w = docs.wrap_signature(sig, width=60)
    assert max(map(len, w.splitlines())) <= 60
    code = lambda s: [l.split("#")[0].rstrip() for l in s.splitlines() if not l.lstrip().startswith("#")]
    assert code(w.replace("'#ff0000'", "RED")) == code(sig.replace("'#ff0000'", "RED"))   # code lines unchanged
    words = lambda s: re.findall(r"[a-z]+", s)
    assert words(w) == words(sig)                                                         # no word lost or moved
    assert "    color:str='#ff0000', # a default" in w and "    x:int=1, # short" in w


def test_title_cell_what_nbdev_drops(tmp_path):
    nb = _nb_json([("code", "#| default_exp x"), ("markdown", "# Title\n\n> first line\n> second line\n\nProse that nbdev drops.\n- skip_exec: true"),
                   ("markdown", "# Not a title")])
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    tc = docs.title_cell(tmp_path / "a.ipynb")
    assert tc["subtitle"] == "first line second line" and tc["lines"] == 2 and tc["lost"] == "Prose that nbdev drops."
    nb["cells"][1]["source"] = "# Title\n> one line"
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    assert docs.title_cell(tmp_path / "a.ipynb")["lost"] == ""


@pytest.mark.parametrize("contents,expect", [
    # the project's own form: sections of auto globs
    ([{"section": "A", "contents": [{"auto": "0*.ipynb"}]}, {"section": "T", "contents": [{"auto": "tutorials/*.ipynb"}]}],
     [("A", ["00_a.ipynb", "01_b.ipynb"]), ("T", ["tutorials/t.ipynb"]), ("More", ["10_c.ipynb"])]),
    # a section's contents as a plain glob string, a folder name, auto: true, hrefs, nested sections
    ([{"section": "A", "contents": "0*.ipynb"}, {"section": "T", "contents": [{"auto": "tutorials"}]}],
     [("A", ["00_a.ipynb", "01_b.ipynb"]), ("T", ["tutorials/t.ipynb"]), ("More", ["10_c.ipynb"])]),
    ([{"href": "10_c.ipynb", "text": "C"}, {"section": "All", "contents": [{"section": "inner", "contents": ["01_b.ipynb"]}, {"auto": True}]}],
     [(None, ["10_c.ipynb"]), ("All", ["01_b.ipynb", "00_a.ipynb", "tutorials/t.ipynb"])]),
    ({"auto": ["1*.ipynb", "0*.ipynb"]}, [(None, ["10_c.ipynb", "00_a.ipynb", "01_b.ipynb"]), ("More", ["tutorials/t.ipynb"])]),
])
def test_sidebar_sections_read_as_quarto_does(tmp_path, contents, expect):
    import yaml
    (tmp_path / "tutorials").mkdir()
    (tmp_path / "_quarto.yml").write_text(yaml.safe_dump({"website": {"sidebar": {"contents": contents}}}))
    av = ["00_a.ipynb", "01_b.ipynb", "10_c.ipynb", "tutorials/t.ipynb"]
    assert docs.sidebar_sections(tmp_path, av) == expect


@pytest.mark.parametrize("item", [{"section": "A", "contents": ["x"], "collapse": True}, {"autos": "*.ipynb"}, {"auto": [1]}])
def test_sidebar_sections_refuse_what_quarto_rejects(tmp_path, item):
    import yaml
    (tmp_path / "_quarto.yml").write_text(yaml.safe_dump({"website": {"sidebar": {"contents": [item]}}}))
    with pytest.raises(SystemExit, match="nbs/_quarto.yml: sidebar item"): docs.sidebar_sections(tmp_path, ["00_a.ipynb"])


def test_processing_error_names_the_notebook(tmp_path, monkeypatch):
    "nbdev names a failing notebook by its title only: the build names the file."
    (tmp_path / "nbs").mkdir()
    (tmp_path / "nbs" / "13_boom.ipynb").write_text(json.dumps(_nb_json([("code", "#| default_exp boom"), ("markdown", "# Boom\n\n> x")])))
    (tmp_path / "nbs" / "14_other.ipynb").write_text(json.dumps(_nb_json([("markdown", "# Other")])))
    monkeypatch.setattr(docs, "ROOT", tmp_path)
    assert docs._which_notebook("Error in notebook: Boom in cell 3 :\nimport x") == " in nbs/13_boom.ipynb"
    assert docs._which_notebook("something else") == ""


def test_source_links_get_the_line():
    "nbdev 3.3 writes `#LNone` on every source link: the page links the line where the symbol is defined."
    gh = "https://github.com/fatebook/fatebook/blob/main/fatebook/fate.py"
    lines = (REPO / "fatebook/fate.py").read_text().splitlines()
    for name, start in [("Lineage", "class Lineage("), ("Lineage.priming_degree", "    def priming_degree("),
                        ("fate_probabilities", "def fate_probabilities(")]:
        link = docs.source_link(gh + "#LNone", name)
        n = int(link.rsplit("#L", 1)[1])
        assert lines[n - 1].startswith(start), (name, n, lines[n - 1])
    assert docs.source_link(gh + "#LNone", "no_such_symbol") == gh            # no line: link the file
    assert docs.source_link(gh + "#L12", "Lineage") == gh + "#L12"              # a real line is kept
    md = f'---\n\n[source]({gh}#LNone){{target="_blank" style="float:right"}}\n\n### Lineage\n\n```python\ndef Lineage(X)\n```\n'
    site = type("S", (), {"labels": {}})()
    out = docs.api_markdown(md, "fate", site, set())
    assert f'href="{gh}#L{lines.index("class Lineage(np.ndarray):") + 1}">source</a>' in out and "LNone" not in out


def test_unannotated_none_default_is_shown_as_written():
    "fastcore shows `x=None` (no annotation) as `x:NoneType=None`; the site shows `x=None`, real annotations kept."
    md = ("---\n\n### f\n\n```python\ndef f(\n    x:NoneType=None, # a thing\n    y:int | None=None, # kept\n"
          "    z:str='NoneType=None', # a string default\n)->NoneType:\n```\n")
    out = docs.api_markdown(md, "core", type("S", (), {"labels": {}})(), set())
    assert "    x=None, # a thing" in out and "y:int | None=None" in out and "->NoneType" in out
    assert "NoneType" not in out.split("x=None")[0]


@pytest.mark.parametrize("doc", ["README.md", "DEVELOPERS.md", "bench/README.md"])
def test_relative_links_resolve(doc):
    """A newcomer found README.md's tutorial link broken: the README is written from nbs/index.ipynb, whose links are
    relative to nbs/ (tools/make_readme.py now rewrites them). Every relative link of these files names a file there."""
    path = REPO / doc
    text = re.sub(r"```.*?```|`[^`\n]*`", "", path.read_text(), flags=re.S)   # (code shows links, it does not make them)
    links = re.findall(r"\]\((?![a-z]+:|#|/)([^)\s]+)\)", text)
    missing = [l for l in links if not (path.parent / l.split("#")[0]).exists()]
    assert not missing, missing
