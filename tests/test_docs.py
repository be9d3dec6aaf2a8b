"""The documentation site (issue 12): built from the notebooks by `bash tools/docs.sh`, checked statically and in
headless Chromium.

The build runs nbdev's own processing (`nbdev-proc-nbs`) on every notebook, so a notebook that nbdev cannot process
fails here. The site must have a page for every notebook, in the navigation; no broken internal link or fragment
anywhere; no Python traceback; no nbdev directive or `#| hide` cell on a page; every image loads in the browser;
MathJax renders; search finds an API entry. Screenshots of the home page, an API page and the tutorial are saved
in `_build/screenshots/` (git-ignored) for a person to look at. The last test plants each kind of fault in a copy of
the built site and checks that these checks catch it.
"""
from __future__ import annotations
import json, os, re, shutil, subprocess, sys, time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from browser import chrome, require_browser, static_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import check_site, docs  # noqa: E402

SHOTS = REPO / "_build" / "screenshots"
API_PAGE = "fate.html"                 # an API page: show_doc entries, examples, maths
TUTORIAL = "tutorials/pancreas.html"
pytestmark = pytest.mark.slow


def notebooks() -> list[str]:
    nbs = REPO / "nbs"
    return sorted(p.relative_to(nbs).as_posix() for p in nbs.rglob("*.ipynb")
                  if not any(s.startswith(("_", ".")) for s in p.relative_to(nbs).parts))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "Build the site with tools/docs.sh into a private folder; returns (site dir, build log, seconds)."
    out = tmp_path_factory.mktemp("docs")
    watched = [REPO / "nbs" / "nbdev.yml", REPO / "nbs" / "_quarto.yml"]
    before = {p: p.read_bytes() for p in watched}
    t0 = time.time()
    r = subprocess.run(["bash", "tools/docs.sh", "--out", str(out / "site"), "--build", str(out / "build")],
                       cwd=REPO, capture_output=True, text=True, timeout=1800)
    secs = time.time() - t0
    log = r.stdout + r.stderr
    print(log[-3000:]); print(f"docs build: {secs:.0f} s")
    assert r.returncode == 0, f"bash tools/docs.sh failed:\n{log[-6000:]}"
    changed = [p.name for p in watched if p.read_bytes() != before[p]]
    assert not changed, (f"nbdev's processing rewrote {changed}: commit what it generated (nbdev.yml comes from "
                         "pyproject.toml's [project]/[tool.nbdev] settings)")
    # nothing written beside the site and the build folder (MyST-NB's jupyter_execute/ once landed next to the site,
    # i.e. in the repository when the site is _site/)
    assert sorted(p.name for p in out.iterdir()) == ["build", "site"], sorted(p.name for p in out.iterdir())
    return out / "site", log, secs


def test_build_has_no_sphinx_warnings(site):
    info = json.loads((site[0] / "_pages.json").read_text())
    assert info["warnings"] == [], "Sphinx warnings:\n" + "\n".join(info["warnings"])
    for n in info["notes"]: print("note:", n)       # worked around by the build; the notebook's owner should fix it


def test_every_notebook_has_a_page_in_the_navigation(site):
    root = site[0]
    pages = json.loads((root / "_pages.json").read_text())["pages"]
    assert sorted(pages) == notebooks(), "processed notebooks differ from nbs/"
    nav = check_site.page(root / "index.html").refs
    linked = {url.split("#")[0] for tag, attr, url in nav if tag == "a"}
    for nb, doc in pages.items():
        assert (root / f"{doc}.html").is_file(), f"{nb}: no page {doc}.html"
        if doc != "index": assert f"{doc}.html" in linked, f"{nb}: {doc}.html is not in the navigation"
    # every module notebook's page carries its API entries (show_doc: a heading with a link to the source)
    for nb, doc in pages.items():
        if "#| default_exp" in (REPO / "nbs" / nb).read_text():
            refs = check_site.page(root / f"{doc}.html").refs
            assert any(u.startswith("https://github.com/") and "/fatebook/" in u for _, _, u in refs), f"{doc}.html: no API entries"
    # the sections of nbs/_quarto.yml, in order
    sections = json.loads((root / "_pages.json").read_text())["sections"]
    assert [s for s, _ in sections][:3] == ["Foundations", "Kernels", "Numerical cores"]
    html = (root / "index.html").read_text()
    assert all(html.find(a) < html.find(b) for a, b in [("Foundations", "Kernels"), ("Kernels", "Tutorials")])


def test_internal_links_resolve(site):
    problems = check_site.broken_links(site[0])
    assert not problems, f"{len(problems)} broken internal link(s):\n" + "\n".join(problems[:40])


def test_no_traceback_machine_path_directive_or_hidden_cell_on_any_page(site):
    problems = check_site.tracebacks(site[0]) + check_site.machine_paths(site[0]) + check_site.leaks(site[0])
    assert not problems, "\n".join(problems[:40])


def test_api_page_content(site):
    "show_doc entries (heading + signature + source link) and prose of an API page; hidden tests are not shown."
    p = check_site.page(site[0] / API_PAGE)
    assert "fate_probabilities" in p.ids or "fate.fate_probabilities" in p.ids or any("fate-probabilities" in i for i in p.ids)
    assert any(u.startswith("https://github.com/") and "fatebook/fate.py" in u for _, _, u in p.refs), "no source links"
    sig = [pre for pre in p.pres if pre.lstrip().startswith("def fate_probabilities(")]
    assert sig, "no signature of fate_probabilities"
    # docments comments wrapped to the code column: every argument's description readable without scrolling
    assert "terminal" in sig[0] and max(map(len, sig[0].splitlines())) <= docs.SIG_WIDTH, sig[0]
    assert "absorption" in p.text.lower()


def test_title_cell_prose_is_shown(site):
    "Prose written in a notebook's title cell (nbdev and Quarto drop that cell) is on its page, in order."
    pages = json.loads((site[0] / "_pages.json").read_text())["pages"]
    checked = 0
    for nb, doc in pages.items():
        lost = docs.title_cell(REPO / "nbs" / nb)["lost"]
        if not lost: continue
        words = re.findall(r"[A-Za-z]{4,}", re.sub(r"\]\([^)]*\)", "]", lost))[:12]
        text = " ".join(re.findall(r"[A-Za-z]{4,}", check_site.page(site[0] / f"{doc}.html").text))
        assert " ".join(words) in text, f"{doc}.html does not show the title cell's prose: {lost[:200]}"
        checked += 1
    print(f"{checked} notebook(s) with prose in the title cell")


def browser_problems(drv, url: str, timeout: float = 30) -> list[str]:
    "Load `url`; images that did not load, resources that failed, MathJax left unrendered."
    drv.get(url)
    deadline = time.time() + timeout
    state = {}
    while time.time() < deadline:
        state = drv.execute_script("""
            const imgs = [...document.images];
            const math = document.querySelectorAll('span.math, div.math').length;
            const rendered = document.querySelectorAll('.MathJax, .MathJax_CHTML, .MathJax_Display, mjx-container').length;
            return {ready: document.readyState, pending: imgs.filter(i => !i.complete).length,
                    broken: imgs.filter(i => i.complete && i.naturalWidth === 0).map(i => i.getAttribute('src')),
                    n_img: imgs.length, math: math, rendered: rendered,
                    failed: performance.getEntriesByType('resource')
                              .filter(e => e.responseStatus >= 400).map(e => e.name + ' ' + e.responseStatus)};""")
        if state["ready"] == "complete" and not state["pending"] and (not state["math"] or state["rendered"]): break
        time.sleep(0.25)
    out = [f"image did not load: {s}" for s in state.get("broken", [])]
    out += [f"resource failed: {f}" for f in state.get("failed", [])]
    if state.get("pending"): out.append(f"{state['pending']} image(s) still loading after {timeout} s")
    if state.get("math") and not state.get("rendered"): out.append(f"{state['math']} maths element(s) not rendered by MathJax")
    return out


def test_pages_in_chromium(site):
    "Home, API page and tutorial in headless Chromium (screenshots saved); every other page: images and resources."
    require_browser()
    root = site[0]
    SHOTS.mkdir(parents=True, exist_ok=True)
    all_pages = [p.relative_to(root).as_posix() for p in check_site.pages(root)]
    problems = {}
    with static_server(root) as url, chrome(width=1400, height=1000) as drv:
        for name in ["index.html", API_PAGE, TUTORIAL]:
            problems[name] = browser_problems(drv, f"{url}/{name}")
            h = drv.execute_script("return document.documentElement.scrollHeight")
            drv.set_window_size(1400, min(int(h), 12000)); time.sleep(0.5)
            drv.save_screenshot(str(SHOTS / (name.replace("/", "_").replace(".html", ".png"))))
            drv.set_window_size(1400, 1000)
            title = drv.title
            assert "fatebook" in title, f"{name}: title {title!r}"
        n_img = drv.execute_script("return document.images.length")   # still on the tutorial
        assert n_img >= 5, f"the tutorial shows {n_img} images"
        # the site's styles reach the outputs: long outputs scroll in their box, DataFrames without a cell grid
        style = drv.execute_script("""
            const pre = document.querySelector('div.cell_output .output pre'), td = document.querySelector('table.dataframe td');
            return {pre: pre && [getComputedStyle(pre).maxHeight, getComputedStyle(pre).overflowY],
                    td: td && getComputedStyle(td).borderTopStyle};""")
        assert style["pre"] and style["pre"][0] != "none" and style["pre"][1] == "auto", style
        assert style["td"] == "none", style
        for name in all_pages:
            if name not in problems: problems[name] = browser_problems(drv, f"{url}/{name}")
        # search (Sphinx's client-side index) finds an API entry
        drv.get(f"{url}/search.html?q=fate_probabilities")
        hits = []
        for _ in range(80):
            hits = drv.execute_script("return [...document.querySelectorAll('#search-results a, ul.search a')].map(a => a.getAttribute('href'))")
            if hits: break
            time.sleep(0.25)
        assert any(h.startswith(API_PAGE) for h in hits), f"search for fate_probabilities found {hits}"
    bad = {k: v for k, v in problems.items() if v}
    assert not bad, "\n".join(f"{k}: {p}" for k, v in bad.items() for p in v)
    print(f"screenshots in {SHOTS}")


def _plant(root: Path, page: str, html: str, before: str = "</article>"):
    p = root / page
    s = p.read_text(); assert before in s
    p.write_text(s.replace(before, html + before, 1))     # a longer file: check_site's page cache sees the change


def test_checks_catch_planted_faults(site, tmp_path):
    "Each kind of fault, planted once in a copy of the built site, is caught by the checks above."
    root = tmp_path / "site"
    shutil.copytree(site[0], root)
    # only what is planted here counts (the real site's own problems are the other tests' business)
    base = {f: set(f(root)) for f in (check_site.broken_links, check_site.tracebacks, check_site.machine_paths, check_site.leaks)}
    new = lambda f: set(f(root)) - base[f]
    # 1. a missing figure: delete the file of the tutorial's first image
    img = next(u for t, a, u in check_site.page(root / TUTORIAL).refs if t == "img")
    (root / "tutorials" / img).resolve().unlink()
    assert any("no such file" in p and img in p for p in new(check_site.broken_links))
    # 2. a broken internal link and a fragment that is on no page
    _plant(root, "index.html", '<p><a href="nosuch.html">x</a> <a href="fate.html#no-such-entry">y</a></p>')
    bl = new(check_site.broken_links)
    assert any("nosuch.html" in p for p in bl) and any("no-such-entry" in p for p in bl)
    # 3. links to the published site (a doclink that was not made internal; one to a page that does not exist here)
    _plant(root, API_PAGE, '<p><a href="https://fatebook.github.io/fatebook/fate.html#lineage">Lineage</a>'
                           '<a href="https://fatebook.github.io/fatebook/nosuch.html#run">run</a></p>')
    bl = new(check_site.broken_links)
    assert any("published site, not to this one" in p for p in bl) and any("nosuch.html is no page" in p for p in bl)
    # 4. a Python traceback in an output
    _plant(root, API_PAGE, '<div class="cell_output"><pre>Traceback (most recent call last):\n  File "x", line 1\nValueError: boom</pre></div>')
    assert any(API_PAGE in p for p in new(check_site.tracebacks))
    # 5. a machine path in an output (not in a code cell's input, where a path can be an example)
    _plant(root, API_PAGE, '<div class="cell_input"><pre>adata = read("/tmp/example.h5ad")</pre></div>')
    assert not new(check_site.machine_paths)
    _plant(root, API_PAGE, '<div class="cell_output"><pre>saved to /work/main/results/x.h5ad</pre></div>')
    assert any(API_PAGE in p and "/work/main/results" in p for p in new(check_site.machine_paths))
    # 6. a directive and a `#| hide` cell of the notebook leaking into the page
    hidden = sorted(check_site.hidden_lines(REPO / "nbs" / "04_fate.ipynb"))
    assert hidden, "04_fate has no #| hide cell lines to plant"
    _plant(root, API_PAGE, f'<div class="cell"><pre>#| hide\n{hidden[0]}</pre></div>')
    lk = new(check_site.leaks)
    assert any("directive" in p for p in lk) and any("#| hide` cell" in p for p in lk)
    # the browser sees the missing image and the missing page
    require_browser()
    with static_server(root) as url, chrome() as drv:
        assert any("image did not load" in p for p in browser_problems(drv, f"{url}/{TUTORIAL}", timeout=15))
        _plant(root, "index.html", '<img src="_images/nosuch.png">')
        assert any("nosuch.png" in p for p in browser_problems(drv, f"{url}/index.html", timeout=15))
