"""Build fatebook's documentation site from the notebooks (issue 12). `bash tools/docs.sh` runs this.

1. **nbdev's own processing** (`nbdev-proc-nbs`, the step `nbdev-docs` runs before Quarto) writes `_proc/`: `#| hide`,
   exported and `default_exp` cells dropped, the `show_doc` API entries added and executed, doclinks added. It is
   run as nbdev runs it, except that nbdev's attempt to download Quarto is skipped (Quarto cannot be installed here)
   and `fatebook/_modidx.py` is not rewritten (nbdev-export writes it).
2. **Staging** turns `_proc/` into a Sphinx source tree in `_build/docs/src`: the frontmatter becomes the page title
   and subtitle, Quarto cell options (`echo`, `output`, `include`, `code-fold`) become MyST-NB tags and every other
   `#|` line is dropped, `output: asis` markdown (the API entries) becomes page markdown with one label per entry,
   nbdev's doclinks (absolute URLs of the Quarto site) become cross-references, and the sidebar sections come from
   `nbs/_quarto.yml` (its `auto` globs included), so the Quarto site and this one list the same pages in one order.
3. **Sphinx** with MyST-NB (configuration in `docs/conf.py`, execution off: the stored outputs are what readers see)
   writes the static site, with search, to `_site/`. MathJax is served from the site itself (no CDN).

Before step 1 every notebook is checked (`notebook_problems`: UTF-8, valid Unicode, valid Python, `export` without
`default_exp`, cells mixing imports with code): a problem stops the build with one line naming notebook and cell.

Usage: python tools/docs.py [--out _site] [--build _build/docs] [--force] [--no-proc] [--traceback]
"""
from __future__ import annotations
import argparse, ast, fcntl, json, os, posixpath, re, shutil, subprocess, sys, textwrap, time, tokenize, io
from fnmatch import fnmatch
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
BUILD = ROOT / "_build" / "docs"
CALLOUTS = {"note": "note", "tip": "tip", "warning": "warning", "important": "important", "caution": "caution"}
_dir_line = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_md_link = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(\s+\"[^\"]*\")?\s*\)(\{[^}\n]*\})?")
_heading = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_progress_bar = re.compile(r"^\s*[^|\n]*\d+%\|.*\|\s*\d+/\d+")


# ---------------------------------------------------------------- 0. preflight
_export_dir = re.compile(r"^\s*#\s*\|\s*(export|exports|exporti)\s*(\S*)\s*$", re.M)
_default_exp = re.compile(r"^\s*#\s*\|\s*default_exp\s+\S", re.M)


def source_notebooks(nbs: Path | None = None) -> list[Path]:
    "The notebooks nbdev processes: every .ipynb under nbs/ outside folders and files starting with `_` or `.`."
    nbs = Path(nbs or ROOT / "nbs")
    return sorted(p for p in nbs.rglob("*.ipynb") if not any(s.startswith(("_", ".")) for s in p.relative_to(nbs).parts))


def _bad_unicode(x, where: str):
    "(where, text) of the first string in a JSON value that is not valid Unicode (a lone surrogate), else None."
    if isinstance(x, str):
        try: x.encode("utf-8")
        except UnicodeEncodeError as e: return where, x[max(0, e.start - 30): e.end + 30]
    elif isinstance(x, list):
        for i, v in enumerate(x):
            if (r := _bad_unicode(v, where)): return r
    elif isinstance(x, dict):
        for k, v in x.items():
            if (r := _bad_unicode(v, where)): return r
    return None


def notebook_problems(path: Path) -> list[str]:
    """What makes a notebook unfit for the site, each problem as one line naming the cell and the fix: not UTF-8, not
    JSON, text that is not valid Unicode, a code cell that is not valid Python, `#| export` cells without a
    `#| default_exp` (their functions are in no module), a cell that mixes imports with other code (nbdev's
    processing runs such cells alone). nbdev's processing would fail on these with a traceback that names no
    notebook, or silently drop the cell from the page."""
    raw = Path(path).read_bytes()
    try: text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return [f"not UTF-8: byte 0x{raw[e.start]:02x} on line {line} ({raw[max(0, e.start - 30): e.start + 10]!r}); "
                "notebooks are UTF-8 JSON: re-save it from Jupyter (or re-execute it with tools/exec_nbs.py)"]
    try: nb = json.loads(text)
    except json.JSONDecodeError as e: return [f"not valid notebook JSON: {e}"]
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list): return ["not a notebook (no list of cells)"]
    out = []
    from IPython.core.inputtransformer2 import TransformerManager
    tm = TransformerManager()
    has_default_exp = False
    for i, c in enumerate(nb["cells"]):
        kind = c.get("cell_type")
        if (bad := _bad_unicode(c.get("source"), "source") or _bad_unicode(c.get("outputs"), "outputs")):
            out.append(f"cell {i}: its {bad[0]} hold text that is not valid Unicode (a lone surrogate, e.g. from bytes "
                       f"decoded with errors='surrogateescape'): {bad[1]!r}; decode the bytes properly and re-execute")
            continue
        if kind != "code": continue
        src = _src(c)
        if _default_exp.search(src): has_default_exp = True
        d, _ = split_directives(src)
        if _false(d.get("eval", "true")) and not _export_dir.search(src): continue   # not run anywhere
        try: ast.parse(tm.transform_cell(src))
        except SyntaxError as e:
            out.append(f"cell {i}: not valid Python: {type(e).__name__}: {e.msg} (line {e.lineno} of the cell: "
                       f"{(e.text or '').strip()[:80]!r})")
    exports = [i for i, c in enumerate(nb["cells"]) if c.get("cell_type") == "code"
               for m in [_export_dir.search(_src(c))] if m and not m.group(2)]
    if exports and not has_default_exp:
        out.append(f"cell{'s' if len(exports) > 1 else ''} {', '.join(map(str, exports[:5]))}{' ...' if len(exports) > 5 else ''}: "
                   "`#| export` but the "
                   "notebook has no `#| default_exp NAME` cell: their code goes to no module (nbdev-export skips "
                   "it, the site would document functions fatebook does not have); add `#| default_exp NAME` as "
                   "the first cell, or drop `export`")
    import check_import_cells
    out += [f"cell {i} mixes imports or show_doc() with other code (nbdev's processing runs such a cell alone): "
            f"{' | '.join(head)}; move the imports to the notebook's import cell" for i, head in check_import_cells.bad_cells(path)]
    return out


def preflight(nbs: Path | None = None) -> list[str]:
    "`notebook_problems` of every notebook nbdev processes, as `nbs/X.ipynb: problem` lines."
    nbs = Path(nbs or ROOT / "nbs")
    return [f"{p.relative_to(nbs.parent).as_posix()}: {pr}" for p in source_notebooks(nbs) for pr in notebook_problems(p)]


# ---------------------------------------------------------------- 1. nbdev processing
def nbdev_process(force: bool = False, n_workers: int = 2) -> Path:
    "Run nbdev's docs processing (as `nbdev-proc-nbs`, without the Quarto download) and return `_proc/`."
    import nbdev.quarto as q, nbdev.doclinks
    q._ensure_quarto = lambda: None  # nbdev would try to download and `sudo dpkg -i` Quarto here
    # nbdev would also rewrite fatebook/_modidx.py from the .py files: that index is nbdev-export's to write (the test
    # command checks it is in sync); in a tree shared with people exporting, a docs build must not touch library files
    nbdev.doclinks._build_modidx = lambda *a, **k: None
    cwd = os.getcwd()
    try:
        cache, cfg, path = q._pre_docs(str(ROOT / "nbs"), n_workers=n_workers, force=force)
    finally: os.chdir(cwd)
    return Path(cache)


# ---------------------------------------------------------------- sidebar from _quarto.yml
NAV_ITEM_KEYS = {"href", "file", "url", "text", "icon", "aria-label", "rel", "target", "id", "menu"}   # Quarto's schema


def sidebar_sections(nbs: Path, available: list[str]) -> list[tuple[str | None, list[str]]]:
    """Sections of `nbs/_quarto.yml`'s sidebar as [(caption or None, [notebook paths relative to nbs])].

    Read as Quarto's schema (`sidebar-contents`) defines it: contents are a string, `{auto: ...}` or a list of paths,
    navigation items (`href`/`file`), `{section, contents}` (nested sections are merged into their top section) and
    `{auto: true | glob | folder | [globs]}`; `auto` is expanded over `available` (the processed notebooks) and
    sorted by path as Quarto does. Anything else stops the build with the item named (Quarto would reject it too).
    A notebook listed nowhere goes to a last section "More" so that no page is lost."""
    conf = yaml.safe_load((nbs / "_quarto.yml").read_text()) or {}
    sidebar = (conf.get("website") or {}).get("sidebar") or {}
    if isinstance(sidebar, list): sidebar = sidebar[0] if sidebar else {}     # several sidebars: the first is the site's
    out, seen = [], set()

    def bad(it, why):
        raise SystemExit(f"docs: nbs/_quarto.yml: sidebar item {it!r} {why} (Quarto's sidebar contents are paths, "
                         "{href: ...}, {section: ..., contents: ...} or {auto: true | glob | folder | [globs]})")

    def patterns(a) -> list[str]:
        if a is True: return ["**"]
        if a is False or a is None: return []
        pats = a if isinstance(a, list) else [a]
        if not all(isinstance(x, str) for x in pats): bad({"auto": a}, "is not a glob, a folder or a list of globs")
        res = []
        for x in pats:
            x = x.strip().removeprefix("./").rstrip("/")
            res.append(x + "/**" if not any(c in x for c in "*?[") and (nbs / x).is_dir() else x)
        return res

    def match(pats) -> list[str]:
        res = []
        for p in pats:
            hits = sorted(f for f in available if fnmatch(f, p) and ("**" in p or f.count("/") == p.count("/")))
            res += [h for h in hits if h not in seen and not seen.add(h)]
        return res

    def expand(contents) -> list[str]:
        "Notebooks of a `sidebar-contents` value, in order (sections inside are flattened)."
        if isinstance(contents, str): return match(patterns(contents))
        if isinstance(contents, dict): contents = [contents]
        if not isinstance(contents, list): bad(contents, "is not a list")
        res = []
        for it in contents:
            if isinstance(it, str): res += match(patterns(it))
            elif isinstance(it, dict) and set(it) == {"auto"}: res += match(patterns(it["auto"]))
            elif isinstance(it, dict) and "section" in it:
                if set(it) - {"section", "contents"}: bad(it, f"has keys {sorted(set(it) - {'section', 'contents'})} a section cannot have")
                res += expand(it.get("contents") or [])
            elif isinstance(it, dict) and set(it) <= NAV_ITEM_KEYS:
                target = it.get("href") or it.get("file") or it.get("url")
                if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target): res += match([target.removeprefix("./")])
            else: bad(it, "is not one Quarto accepts")
        return res

    contents = sidebar.get("contents") if isinstance(sidebar, dict) else None
    if contents is None: contents = []
    items = contents if isinstance(contents, list) else [contents]
    top = []
    for it in items:
        if isinstance(it, dict) and "section" in it:
            files = expand([it])
            if files: out.append((str(it["section"]), files))
        else: top += expand([it])
    if top: out.insert(0, (None, top))
    rest = [f for f in available if f not in seen]
    if rest:
        print(f"docs: not in any sidebar section of nbs/_quarto.yml, listed under 'More': {', '.join(rest)}")
        out.append(("More", rest))
    return out


# ---------------------------------------------------------------- 2. staging
def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def split_directives(src: str) -> tuple[dict, str]:
    "Leading `#| key: value` lines of a code cell as a dict, and the source without them."
    lines, d = src.splitlines(), {}
    i = 0
    while i < len(lines):
        m = _dir_line.match(lines[i])
        if m: d[m.group(1).lower()] = m.group(2).strip().strip("'\"")
        elif lines[i].strip(): break
        i += 1
    return d, "\n".join(lines[i:]).strip("\n")


def _false(v) -> bool: return str(v).strip().lower() in ("false", "no", "0")


class Site:
    "Maps processed notebooks to site pages and rewrites links between them."

    def __init__(self, proc: Path, site_url: str):
        self.proc, self.site_url = proc, site_url.rstrip("/") + "/"
        self.notebooks = sorted(p.relative_to(proc).as_posix() for p in proc.rglob("*.ipynb")
                                if not any(s.startswith((".", "_")) for s in p.relative_to(proc).parts))
        self.doc, self.fm = {}, {}      # notebook -> docname (no suffix); notebook -> frontmatter
        for nb in self.notebooks:
            fm = frontmatter(json.loads((proc / nb).read_text()))
            self.fm[nb] = fm
            folder = posixpath.dirname(nb)
            out = fm.get("output-file") or Path(nb).with_suffix(".html").name
            self.doc[nb] = posixpath.join(folder, Path(out).stem) if folder else Path(out).stem
        self.by_html = {d + ".html": d for d in self.doc.values()}
        self.labels = {}                # (docname, anchor) -> label of an API entry
        self.slugs = {}                 # docname -> MyST heading anchors of the page
        self.dangling = []              # links to a fragment that is on no page
        self.notes = []                 # things the notebooks' owners should fix (the site works around them)

    def resolve(self, url: str, here: str) -> tuple[str, str] | None:
        "The (docname, fragment) a link points to, if it is a page of this site; `here` is the linking docname."
        url, frag = (url.split("#", 1) + [""])[:2]
        if url.startswith(self.site_url): path = url[len(self.site_url):]
        elif re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("/"): return None
        elif not url: return (here, frag) if frag else None
        else: path = posixpath.normpath(posixpath.join(posixpath.dirname(here), url))
        if path.endswith(".ipynb") and path in self.doc: return self.doc[path], frag
        if path.endswith(".html") and path in self.by_html: return self.by_html[path], frag
        if path in ("", ".", "index"): return "index", frag
        return None

    def link_target(self, url: str, here: str) -> str | None:
        "A MyST link target for an internal `url` (a label reference or a relative document path), else None."
        r = self.resolve(url, here)
        if r is None: return None
        doc, frag = r
        if frag and (doc, frag.lower()) in self.labels: return "#" + self.labels[doc, frag.lower()]
        rel = posixpath.relpath(doc, posixpath.dirname(here) or ".") + ".ipynb"
        if frag and frag not in self.slugs.get(doc, ()) and url.startswith(self.site_url):
            # a doclink (nbdev writes them as absolute URLs) to a symbol without an API entry: link to its page.
            # A fragment written by hand stays as it is: MyST warns and tools/check_site.py fails on it.
            self.dangling.append(f"{doc}#{frag}"); frag = ""
        return rel + ("#" + frag if frag else "")

    def rewrite_links(self, md: str, here: str) -> str:
        "Internal links become cross-references; Quarto link attributes (`{target=...}`) are dropped."
        def sub(m):
            bang, text, url, title, attrs = m.groups()
            if bang: return m.group(0)[: len(m.group(0)) - len(attrs)] if attrs else m.group(0)
            t = self.link_target(url, here)
            return f"[{text}]({t if t else url}{title or ''})"
        return _md_link.sub(sub, md)


def slugify(title: str) -> str:
    "MyST's heading anchor (`myst_heading_anchors`) for a heading text."
    try:
        from myst_parser.mdit_to_docutils.base import default_slugify
        return default_slugify(title)
    except ImportError: return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def _fenced_out(md: str) -> str:
    "Markdown without its fenced code blocks (a `# comment` in code is no heading)."
    return re.sub(r"^(```|~~~).*?^\1\s*$", "", md, flags=re.M | re.S)


def frontmatter(nb: dict) -> dict:
    "The YAML frontmatter nbdev put in the first raw cell of a processed notebook ({} if none)."
    for c in nb["cells"][:2]:
        s = _src(c).strip()
        if c["cell_type"] == "raw" and s.startswith("---"):
            try: return yaml.safe_load(s.strip("-\n")) or {}
            except yaml.YAMLError: return {}
    return {}


def quarto_md(md: str) -> str:
    "Quarto-only markdown to MyST: callout divs become admonitions, other fenced divs are unwrapped."
    out, stack = [], []
    for line in md.splitlines():
        m = re.match(r"^(:{3,})\s*\{([^}]*)\}\s*$", line) or re.match(r"^(:{3,})\s*([.\w-]+)\s*$", line)
        if m:
            cls = re.findall(r"\.callout-(\w+)", m.group(2))
            kind = CALLOUTS.get(cls[0], "note") if cls else None
            stack.append(kind)
            if kind: out.append(f":::{{{kind}}}")
            continue
        if re.match(r"^:{3,}\s*$", line) and stack:
            if stack.pop(): out.append(":::")
            continue
        out.append(line)
    return "\n".join(out)


SIG_WIDTH = 84     # characters of code that fit the page's code column without scrolling (furo, 1400 px window)


def wrap_signature(code: str, width: int = SIG_WIDTH) -> str:
    """A `show_doc` signature with its long docments comments wrapped under themselves, so that a reader sees every
    argument's description without scrolling sideways; code is never changed, lines that fit stay as they are."""
    try: comments = {t.start[0]: t for t in tokenize.generate_tokens(io.StringIO(code + "\n").readline)
                     if t.type == tokenize.COMMENT}
    except (tokenize.TokenError, SyntaxError, IndentationError): return code
    out = []
    for n, line in enumerate(code.splitlines(), 1):
        t = comments.get(n)
        if len(line) <= width or t is None: out.append(line); continue
        col = t.start[1]
        text = t.string.lstrip("#").strip()
        room = width - col - 2
        if room < 24: col, room = 8, width - 10          # the code is long: wrap the comment on lines of its own
        chunks = textwrap.wrap(text, room, break_on_hyphens=False) or [""]
        if col == t.start[1]: out.append(line[:col] + "# " + chunks[0]); chunks = chunks[1:]
        else: out.append(line[:t.start[1]].rstrip())
        out += [" " * col + "# " + c for c in chunks]
    return "\n".join(out)


_def_lines_cache: dict = {}

def _def_lines(py: str) -> dict:
    "Line of every top-level function/class and class member of the repository file `py` ('Cls', 'Cls.meth', 'f')."
    if py not in _def_lines_cache:
        d = {}
        try: tree = ast.parse((ROOT / py).read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError): tree = ast.Module(body=[], type_ignores=[])
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        for t in tree.body:
            if not isinstance(t, kinds): continue
            d.setdefault(t.name, t.lineno)
            if isinstance(t, ast.ClassDef):
                for m in t.body:
                    if isinstance(m, kinds): d.setdefault(f"{t.name}.{m.name}", m.lineno)
        _def_lines_cache[py] = d
    return _def_lines_cache[py]

def source_link(url: str, name: str) -> str:
    """nbdev 3.3 writes `#LNone` for every symbol (it looks the line up by the qualified name in a table keyed by the
    short one): give the link the line where `name` is defined in the file, or no fragment where it is not found."""
    if not url.endswith("#LNone"): return url
    url = url[:-len("#LNone")]
    m = re.search(r"/blob/[^/]+/(.+)$", url)
    line = _def_lines(m.group(1)).get(name.strip("` ")) if m else None
    return f"{url}#L{line}" if line else url


def api_markdown(md: str, doc: str, site: Site, used: set) -> str:
    "A `show_doc` entry (nbdev's `output: asis` markdown) as page markdown: a label on its heading, source link kept."
    lines = md.strip("\n").splitlines()
    while lines and lines[0].strip() in ("---", ""): lines.pop(0)
    heads = [h.group(2) for h in map(_heading.match, lines) if h]
    out, source = [], None
    for line in lines:
        m = re.match(r"^\[source\]\((\S+?)\)(\{[^}]*\})?\s*$", line.strip())
        if m:
            href = source_link(m.group(1), heads[0] if heads else "")
            source = f'<a class="fb-source reference external" href="{href}">source</a>'; continue
        h = _heading.match(line)
        if h:
            anchor = h.group(2).strip("` ").lower()
            label = f"{doc}.{anchor}"
            if label not in used:
                used.add(label); site.labels[doc, anchor] = label
                out.append(f"({label})=")
            out.append(line)
            if source: out += ["", source]; source = None
            continue
        out.append(line)
    if source: out.insert(0, source)
    md = "\n".join(out)
    return re.sub(r"^```python\n(.*?)^```", lambda m: "```python\n" + wrap_signature(_untyped_none(m.group(1).rstrip("\n")))
                  + "\n```", md, flags=re.M | re.S)


def _untyped_none(sig: str) -> str:
    """fastcore's docments annotate an argument without annotation by its default's type: `x=None` is shown as
    `x:NoneType=None`, which reads as "x must be None". Show it as written, `x=None`."""
    return re.sub(r"(\w):NoneType=None\b", r"\1=None", sig)


def title_cell(nb_path: Path) -> dict:
    """What nbdev's frontmatter processor does with a notebook's title cell, read from the source notebook.

    nbdev (fastcore's `md_frontmatter`) takes the first markdown cell with a `# Title` line (unless a raw
    frontmatter cell gives the title), keeps the title, the first `> ` line as description and `- key: value` lines,
    and drops the whole cell. Returns {"subtitle": the `>` block under the title, all its lines joined, "lines": its
    number of lines, "lost": the rest of the cell (prose that nbdev and Quarto do not show), "attachments": ...}."""
    nb = json.loads(Path(nb_path).read_text())
    none = {"subtitle": None, "lines": 0, "lost": "", "attachments": None}
    for c in nb["cells"]:
        if c["cell_type"] == "raw" and "title" in frontmatter({"cells": [c]}): return none
        if c["cell_type"] != "markdown": continue
        lines = _src(c).splitlines()
        t = next((i for i, l in enumerate(lines) if re.match(r"^#\s+\S", l)), None)
        if t is None: continue
        quote, kept, i = [], {t}, t + 1
        while i < len(lines) and not lines[i].strip(): i += 1
        while i < len(lines) and lines[i].lstrip().startswith(">"):
            quote.append(lines[i].lstrip()[1:].strip()); kept.add(i); i += 1
        kept |= {j for j, l in enumerate(lines) if re.match(r"^-\s+(\S.*:.*\S)\s*$", l)}   # nbdev's frontmatter lines
        lost = "\n".join(l for j, l in enumerate(lines) if j not in kept).strip()
        return {"subtitle": " ".join(quote) or None, "lines": len(quote), "lost": lost, "attachments": c.get("attachments")}
    return none


def _md_cell(text: str) -> dict: return {"cell_type": "markdown", "metadata": {}, "source": text}


def stage_notebook(nb: dict, nbpath: str, site: Site, used: set) -> dict:
    "One processed notebook as a valid nbformat-4 notebook for MyST-NB (see the module docstring)."
    doc, fm = site.doc[nbpath], site.fm[nbpath]
    cells = []
    title = fm.get("title") or Path(nbpath).stem
    head = f"# {title}"
    desc = str(fm.get("description") or "").strip()
    tc = title_cell(ROOT / "nbs" / nbpath) if (ROOT / "nbs" / nbpath).exists() else {"lines": 0, "lost": ""}
    full, n = tc.get("subtitle"), tc["lines"]
    if n > 1 and full and full.startswith(desc):   # nbdev keeps the first line of a subtitle only: show all of it
        site.notes.append(f"{nbpath}: the `>` subtitle spans {n} lines; nbdev (and Quarto) keep only the first: "
                          "write it on one line"); desc = full
    if desc: head += f"\n\n> {desc}"
    cells.append(_md_cell(head))
    if tc["lost"]:    # nbdev drops the whole title cell: show its prose, as the notebook does
        site.notes.append(f"{nbpath}: the title cell holds more than `# title` and `> subtitle`; nbdev (and Quarto) "
                          "drop the rest: move that text to a markdown cell of its own")
        cell = _md_cell(quarto_md(tc["lost"]))
        if tc.get("attachments"): cell["attachments"] = tc["attachments"]
        cells.append(cell)
    for c in nb["cells"]:
        s = _src(c)
        if c["cell_type"] == "raw":
            if s.strip().startswith("---") and c is nb["cells"][0]: continue
            cells.append({"cell_type": "raw", "metadata": {}, "source": s}); continue
        if c["cell_type"] == "markdown":
            if re.fullmatch(r"\s*<!--.*?-->\s*", s, re.S): continue   # nbdev's "autogenerated" warning
            cell = _md_cell(quarto_md(s))
            if c.get("attachments"): cell["attachments"] = c["attachments"]
            cells.append(cell); continue
        d, code = split_directives(s)
        if _false(d.get("include", "true")): continue
        outputs = [o for o in c.get("outputs", []) if o.get("output_type") != "stream" or o.get("text")]
        asis = d.get("output", "").lower() == "asis"
        echo = not _false(d.get("echo", "true"))
        md_out = []
        if asis:
            keep = []
            for o in outputs:
                md = (o.get("data") or {}).get("text/markdown")
                if md is None: keep.append(o); continue
                md_out.append(api_markdown(_src({"source": md}), doc, site, used))
            outputs = keep
        if _false(d.get("output", "true")): outputs = []
        outputs = [w for w in map(widget_fallback, outputs) if w is not None]
        tags = []
        if not echo: tags.append("remove-input")
        if d.get("code-fold", "false").lower() not in ("false", "show", "no"): tags.append("hide-input")  # folded
        if (echo and code.strip()) or outputs:
            cells.append({"cell_type": "code", "execution_count": None, "metadata": {"tags": tags} if tags else {},
                          "outputs": outputs, "source": code})
        cells += [_md_cell(m) for m in md_out]
    return {"cells": cells, "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                                         "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}


def widget_fallback(o: dict) -> dict:
    "A stored ipywidgets view needs a live kernel: keep its static representations, or say what it is."
    data = o.get("data") or {}
    if "application/vnd.jupyter.widget-view+json" not in data: return o
    o = dict(o); data = {k: v for k, v in data.items() if k != "application/vnd.jupyter.widget-view+json"}
    if _progress_bar.search(_src({"source": data.get("text/plain", "")})): return None   # a tqdm bar: nothing to see
    if not (set(data) - {"text/plain"}):
        data = {"text/markdown": "*Interactive widget: it runs when the notebook runs in Jupyter.*",
                "text/plain": _src({"source": data.get("text/plain", "")})}
    o["data"] = data
    return o


def stage(proc: Path, dest: Path, site_url: str) -> dict:
    """Write the Sphinx source tree `dest` from `_proc`; returns a summary (pages, sections, changed: whether any
    file of the tree changed). A file whose content is unchanged keeps its time, so that Sphinx can skip reading it;
    files no longer produced are removed."""
    dest.mkdir(parents=True, exist_ok=True)
    written, changed = set(), []

    def put(path: Path, data: bytes):
        written.add(path)
        if path.is_file() and path.read_bytes() == data: return
        path.parent.mkdir(parents=True, exist_ok=True); path.write_bytes(data); changed.append(path)
    site = Site(proc, site_url)
    if "index.ipynb" not in site.doc: raise SystemExit("docs: nbs/index.ipynb is missing (the home page)")
    sections = sidebar_sections(ROOT / "nbs", [n for n in site.notebooks if n != "index.ipynb"])
    # API labels first (links may point forward), then every page with its links rewritten
    used, staged = set(), {}
    for nbpath in site.notebooks:
        staged[nbpath] = stage_notebook(json.loads((proc / nbpath).read_text()), nbpath, site, used)
    for nbpath, snb in staged.items():
        site.slugs[site.doc[nbpath]] = {slugify(h.group(2)) for c in snb["cells"] if c["cell_type"] == "markdown"
                                        for h in map(_heading.match, _fenced_out(c["source"]).splitlines()) if h}
    for nbpath, snb in staged.items():
        for cell in snb["cells"]:
            if cell["cell_type"] == "markdown": cell["source"] = site.rewrite_links(cell["source"], site.doc[nbpath])
    if site.dangling:
        print(f"docs: {len(site.dangling)} doclink(s) name a symbol with no API entry; they link to its page:",
              "; ".join(sorted(set(site.dangling))))
    toc = []
    for cap, files in sections:
        toc.append("```{toctree}\n:hidden:\n" + (f":caption: {cap}\n" if cap else "") + ":maxdepth: 1\n\n"
                   + "\n".join(site.doc[f] for f in files) + "\n```")
    staged["index.ipynb"]["cells"].append(_md_cell("\n\n".join(toc)))
    for nbpath, snb in staged.items():
        out = dest / (site.doc[nbpath] + ".ipynb")
        out.parent.mkdir(parents=True, exist_ok=True)
        for i, cell in enumerate(snb["cells"]): cell["id"] = f"c{i}"
        put(out, json.dumps(snb, indent=1, ensure_ascii=False).encode())
    # images and other files the notebooks refer to (nbdev copied them to _proc)
    for f in proc.rglob("*"):
        rel = f.relative_to(proc)
        if f.is_file() and f.suffix not in (".ipynb", ".yml", ".yaml", ".txt", ".css") and not any(s.startswith(".") for s in rel.parts):
            put(dest / rel, f.read_bytes())
    stale = [f for f in dest.rglob("*") if f.is_file() and f not in written]
    for f in stale: f.unlink()
    for d in sorted((d for d in dest.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
        if not any(d.iterdir()): d.rmdir()
    for p in site.notes: print("docs: note:", p)
    return {"pages": {n: site.doc[n] for n in site.notebooks}, "sections": sections, "notes": site.notes,
            "changed": len(changed) + len(stale)}


# ---------------------------------------------------------------- 3. Sphinx
def mathjax(dest: Path, cache: Path):
    """Put MathJax 2 (from the jupyter-server-mathjax package) into the built site's static files: no CDN needed.
    The package's files are copied once into `cache` (596 files, 12 MB: ~8 s on a loaded machine) and hard-linked
    from there into each new site (copied where the file system cannot link); the package itself is never linked."""
    import jupyter_server_mathjax
    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    stamp = f"{src}:{(src / 'MathJax.js').stat().st_mtime_ns}"
    if not (cache / ".source").is_file() or (cache / ".source").read_text() != stamp:
        if cache.exists(): shutil.rmtree(cache)
        shutil.copytree(src, cache, ignore=shutil.ignore_patterns("*.md", "unpacked", "test*", "docs"))
        (cache / ".source").write_text(stamp)
    if dest.exists(): shutil.rmtree(dest)

    def link_or_copy(a, b):
        try: os.link(a, b)
        except OSError: shutil.copy2(a, b)
    shutil.copytree(cache, dest, ignore=shutil.ignore_patterns(".source"), copy_function=link_or_copy)


def sphinx(src: Path, html: Path, doctrees: Path, fresh: bool = True) -> list[str]:
    """Run Sphinx (HTML builder) into `html`, a folder of the build tree (MyST-NB writes `jupyter_execute/` beside
    it, so it must not be the repository's `_site/`); returns its warnings.

    `fresh=False` reuses the environment in `doctrees`: only pages whose source changed are read again (reading the
    notebooks is most of Sphinx's time), while every page is still written (`-a`), so links, the navigation and the
    search index are resolved against all pages as they are now."""
    if html.exists(): shutil.rmtree(html)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-a"] + (["-E"] if fresh else []) + [
           "-j", "1", "-c", str(ROOT / "docs"), "-d", str(doctrees), str(src), str(html)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    warnings = [l for l in r.stderr.splitlines() if l.strip()]
    if r.returncode: raise SystemExit("docs: sphinx-build failed:\n" + r.stderr[-5000:])
    return warnings


def check_out(out: Path, build: Path):
    "Refuse output and build folders whose replacement would delete something else than an earlier build."
    for what, d in (("--out", out), ("--build", build)):
        if d == ROOT or d in ROOT.parents or d == ROOT / "nbs" or (ROOT / "nbs") in d.parents:
            raise SystemExit(f"docs: {what} {d} would replace the repository or its notebooks: choose a folder of its own")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / ".buildinfo").exists())):
        raise SystemExit(f"docs: --out {out} exists and is not a site built by this tool (no .buildinfo in it); it "
                         "would be replaced: choose another folder or remove it yourself")


def publish(html: Path, out: Path):
    "Replace `out` with the new site only once it is complete (a failed build leaves the previous site in place)."
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.new")
    if tmp.exists(): shutil.rmtree(tmp)
    shutil.move(str(html), str(tmp))
    if out.exists(): shutil.rmtree(out)
    os.replace(tmp, out)


def _which_notebook(msg: str) -> str:
    "nbdev names a failing notebook by its title ('Error in notebook: TITLE in cell N'): the file(s) with that title."
    m = re.search(r"Error in notebook: (.*?) in cell \d+", msg)
    if not m: return ""
    hits = []
    for p in source_notebooks():
        try: cells = json.loads(p.read_text())["cells"]
        except Exception: continue
        for c in cells:
            t = re.search(r"^#\s+(\S.*?)\s*$", _src(c), re.M) if c.get("cell_type") == "markdown" else None
            if t: hits += [p.relative_to(ROOT).as_posix()] if t.group(1) == m.group(1) else []; break
    return f" in {', '.join(hits)}" if hits else ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="output folder (default: _site/)")
    ap.add_argument("--build", default=str(BUILD), help="staging folder (default: _build/docs/)")
    ap.add_argument("--force", action="store_true", help="reprocess and re-read every notebook (ignore nbdev's _proc cache "
                    "and Sphinx's environment)")
    ap.add_argument("--no-proc", action="store_true", help="reuse _proc/ as it is (no nbdev processing)")
    ap.add_argument("--traceback", action="store_true", help="show the full traceback when nbdev's processing fails")
    a = ap.parse_args(argv)
    out, build = Path(a.out).resolve(), Path(a.build).resolve()
    check_out(out, build)
    (ROOT / "_build").mkdir(exist_ok=True)
    with open(ROOT / "_build" / "docs.lock", "w") as lock:   # two builds in one tree (nbdev's _proc/) wait in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.time()
        problems = preflight()
        if problems:
            for pr in problems: print("docs:", pr)
            raise SystemExit(f"docs: {len(problems)} problem(s) in the notebooks (above): fix them and build again")
        if a.no_proc: proc = ROOT / "_proc"
        else:
            print("docs: nbdev processing (nbdev-proc-nbs) -> _proc/", flush=True)
            try: proc = nbdev_process(force=a.force)
            except Exception as e:
                if a.traceback: raise
                raise SystemExit(f"docs: nbdev's processing (nbdev-proc-nbs) failed{_which_notebook(str(e))}:\n"
                                 f"{type(e).__name__}: {e}\n(the full traceback: add --traceback)") from None
        t1 = time.time()
        site_url = yaml.safe_load((ROOT / "nbs" / "nbdev.yml").read_text())["website"]["site-url"]
        summary = stage(proc, build / "src", site_url)
        print(f"docs: {len(summary['pages'])} pages staged; sidebar: "
              + "; ".join(f"{c or '(top)'}: {len(f)}" for c, f in summary["sections"]), flush=True)
        shutil.rmtree(build / "static", ignore_errors=True)      # MathJax's place in builds before 2026-11-30
        html = build / "html"
        # Sphinx reads again only what changed, unless the last build warned (its warnings would not be repeated for
        # the pages it skips), the build is forced, or there is no last build
        last = build / "warnings.json"
        fresh = a.force or not last.is_file() or json.loads(last.read_text() or "null") != []
        last.unlink(missing_ok=True)
        warnings = sphinx(build / "src", html, build / "doctrees", fresh=fresh)
        last.write_text(json.dumps(warnings))
        mathjax(html / "_static" / "mathjax", build / "mathjax")
        if (html / "_sources").is_dir() and not any((html / "_sources").iterdir()): (html / "_sources").rmdir()
        summary["warnings"] = warnings; summary.pop("changed", None)
        (html / "_pages.json").write_text(json.dumps(summary, indent=1))
        publish(html, out)
    for w in warnings: print("  sphinx:", w.replace(str(build / "src") + "/", ""))
    print(f"docs: site written to {os.path.relpath(out)}/ ({len(warnings)} Sphinx warnings; "
          f"processing {t1 - t0:.0f} s, site {time.time() - t1:.0f} s{'' if fresh else ': Sphinx read only changed pages'})")
    return 0


if __name__ == "__main__": sys.exit(main())
