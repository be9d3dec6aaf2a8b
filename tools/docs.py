"""Build fatebook's documentation site from the notebooks (issue 12). `bash tools/docs.sh` runs this.

1. **nbdev's own processing** (`nbdev-proc-nbs`, the step `nbdev-docs` runs before Quarto) writes `_proc/`: `#| hide`,
   exported and `default_exp` cells dropped, the `show_doc` API entries added and executed, doclinks added. It is
   run as nbdev runs it, except that nbdev's attempt to download Quarto is skipped (Quarto cannot be installed here).
2. **Staging** turns `_proc/` into a Sphinx source tree in `_build/docs/src`: the frontmatter becomes the page title
   and subtitle, Quarto cell options (`echo`, `output`, `include`, `code-fold`) become MyST-NB tags and every other
   `#|` line is dropped, `output: asis` markdown (the API entries) becomes page markdown with one label per entry,
   nbdev's doclinks (absolute URLs of the Quarto site) become cross-references, and the sidebar sections come from
   `nbs/_quarto.yml` (its `auto` globs included), so the Quarto site and this one list the same pages in one order.
3. **Sphinx** with MyST-NB (configuration in `docs/conf.py`, execution off: the stored outputs are what readers see)
   writes the static site, with search, to `_site/`. MathJax is served from the site itself (no CDN).

Usage: python tools/docs.py [--out _site] [--build _build/docs] [--force] [--no-proc]
"""
from __future__ import annotations
import argparse, fcntl, json, os, posixpath, re, shutil, subprocess, sys, time
from fnmatch import fnmatch
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "_build" / "docs"
CALLOUTS = {"note": "note", "tip": "tip", "warning": "warning", "important": "important", "caution": "caution"}
_dir_line = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_md_link = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]+)>?(\s+\"[^\"]*\")?\s*\)(\{[^}\n]*\})?")
_heading = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_progress_bar = re.compile(r"^\s*[^|\n]*\d+%\|.*\|\s*\d+/\d+")


# ---------------------------------------------------------------- 1. nbdev processing
def nbdev_process(force: bool = False, n_workers: int = 2) -> Path:
    "Run nbdev's docs processing (as `nbdev-proc-nbs`, without the Quarto download) and return `_proc/`."
    import nbdev.quarto as q
    q._ensure_quarto = lambda: None  # nbdev would try to download and `sudo dpkg -i` Quarto here
    cwd = os.getcwd()
    try:
        cache, cfg, path = q._pre_docs(str(ROOT / "nbs"), n_workers=n_workers, force=force)
    finally: os.chdir(cwd)
    return Path(cache)


# ---------------------------------------------------------------- sidebar from _quarto.yml
def sidebar_sections(nbs: Path, available: list[str]) -> list[tuple[str | None, list[str]]]:
    """Sections of `nbs/_quarto.yml`'s sidebar as [(caption or None, [notebook paths relative to nbs])].

    `auto` globs are expanded over `available` (the processed notebooks) and sorted by path as Quarto does; a notebook
    listed nowhere goes to a last section "More" so that no page is lost."""
    conf = yaml.safe_load((nbs / "_quarto.yml").read_text())
    contents = (((conf or {}).get("website") or {}).get("sidebar") or {}).get("contents") or []
    out, seen = [], set()

    def expand(items):
        res = []
        for it in items:
            if isinstance(it, str): pats = [it]
            elif isinstance(it, dict) and "auto" in it:
                a = it["auto"]; pats = a if isinstance(a, list) else [a]
            elif isinstance(it, dict) and "href" in it: pats = [it["href"]]
            else: continue
            for p in pats:
                p = p.lstrip("./")
                hits = sorted(f for f in available if fnmatch(f, p) and ("**" in p or f.count("/") == p.count("/")))
                res += [h for h in hits if h not in seen and not seen.add(h)]
        return res

    top = []
    for it in contents:
        if isinstance(it, dict) and "section" in it:
            files = expand(it.get("contents") or [])
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


def api_markdown(md: str, doc: str, site: Site, used: set) -> str:
    "A `show_doc` entry (nbdev's `output: asis` markdown) as page markdown: a label on its heading, source link kept."
    lines = md.strip("\n").splitlines()
    while lines and lines[0].strip() in ("---", ""): lines.pop(0)
    out, source = [], None
    for line in lines:
        m = re.match(r"^\[source\]\((\S+?)\)(\{[^}]*\})?\s*$", line.strip())
        if m: source = f'<a class="fb-source reference external" href="{m.group(1)}">source</a>'; continue
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
    return "\n".join(out)


def source_subtitle(nb_path: Path) -> tuple[str | None, int]:
    "The `> subtitle` under a notebook's `# Title` (all its lines joined) and its number of lines."
    nb = json.loads(Path(nb_path).read_text())
    for c in nb["cells"]:
        if c["cell_type"] != "markdown": continue
        lines = _src(c).strip().splitlines()
        if not lines or not lines[0].startswith("# "): continue
        quote = []
        for l in (l for l in lines[1:] if l.strip()):
            if not l.lstrip().startswith(">"): break
            quote.append(l.lstrip()[1:].strip())
        return (" ".join(quote) or None), len(quote)
    return None, 0


def _md_cell(text: str) -> dict: return {"cell_type": "markdown", "metadata": {}, "source": text}


def stage_notebook(nb: dict, nbpath: str, site: Site, used: set) -> dict:
    "One processed notebook as a valid nbformat-4 notebook for MyST-NB (see the module docstring)."
    doc, fm = site.doc[nbpath], site.fm[nbpath]
    cells = []
    title = fm.get("title") or Path(nbpath).stem
    head = f"# {title}"
    desc = str(fm.get("description") or "").strip()
    full, n = source_subtitle(ROOT / "nbs" / nbpath) if (ROOT / "nbs" / nbpath).exists() else (None, 0)
    if n > 1 and full and full.startswith(desc):   # nbdev keeps the first line of a subtitle only: show all of it
        site.notes.append(f"{nbpath}: the `>` subtitle spans {n} lines; nbdev (and Quarto) keep only the first: "
                          "write it on one line"); desc = full
    if desc: head += f"\n\n> {desc}"
    cells.append(_md_cell(head))
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
    "Write the Sphinx source tree `dest` from `_proc`; returns a summary (pages, sections)."
    if dest.exists(): shutil.rmtree(dest)
    dest.mkdir(parents=True)
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
        out.write_text(json.dumps(snb, indent=1, ensure_ascii=False))
    # images and other files the notebooks refer to (nbdev copied them to _proc)
    for f in proc.rglob("*"):
        rel = f.relative_to(proc)
        if f.is_file() and f.suffix not in (".ipynb", ".yml", ".yaml", ".txt", ".css") and not any(s.startswith(".") for s in rel.parts):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, dest / rel)
    for p in site.notes: print("docs: note:", p)
    return {"pages": {n: site.doc[n] for n in site.notebooks}, "sections": sections, "notes": site.notes}


# ---------------------------------------------------------------- 3. Sphinx
def mathjax(dest: Path):
    "Copy MathJax 2 (from the jupyter-server-mathjax package) into the site's static files: no CDN needed."
    import jupyter_server_mathjax
    src = Path(jupyter_server_mathjax.__file__).parent / "static"
    if dest.exists(): shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.md", "unpacked", "test*", "docs"))


def sphinx(src: Path, out: Path, static: Path, doctrees: Path) -> list[str]:
    "Run Sphinx (HTML builder); returns its warnings."
    if out.exists(): shutil.rmtree(out)
    env = dict(os.environ, FATEBOOK_DOCS_STATIC=str(static))
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-E", "-j", "1", "-c", str(ROOT / "docs"),
           "-d", str(doctrees), str(src), str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    warnings = [l for l in r.stderr.splitlines() if l.strip()]
    if r.returncode: raise SystemExit("docs: sphinx-build failed:\n" + r.stderr[-5000:])
    return warnings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "_site"), help="output folder (default: _site/)")
    ap.add_argument("--build", default=str(BUILD), help="staging folder (default: _build/docs/)")
    ap.add_argument("--force", action="store_true", help="reprocess every notebook (ignore nbdev's _proc cache)")
    ap.add_argument("--no-proc", action="store_true", help="reuse _proc/ as it is (no nbdev processing)")
    a = ap.parse_args(argv)
    out, build = Path(a.out).resolve(), Path(a.build).resolve()
    (ROOT / "_build").mkdir(exist_ok=True)
    with open(ROOT / "_build" / "docs.lock", "w") as lock:   # two builds in one tree (nbdev's _proc/) wait in turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.time()
        if a.no_proc: proc = ROOT / "_proc"
        else:
            print("docs: nbdev processing (nbdev-proc-nbs) -> _proc/", flush=True)
            proc = nbdev_process(force=a.force)
        t1 = time.time()
        site_url = yaml.safe_load((ROOT / "nbs" / "nbdev.yml").read_text())["website"]["site-url"]
        summary = stage(proc, build / "src", site_url)
        mathjax(build / "static" / "mathjax")
        print(f"docs: {len(summary['pages'])} pages staged; sidebar: "
              + "; ".join(f"{c or '(top)'}: {len(f)}" for c, f in summary["sections"]), flush=True)
        warnings = sphinx(build / "src", out, build / "static", build / "doctrees")
    if (out / "_sources").is_dir() and not any((out / "_sources").iterdir()): (out / "_sources").rmdir()
    for w in warnings: print("  sphinx:", w.replace(str(build / "src") + "/", ""))
    summary["warnings"] = warnings
    (out / "_pages.json").write_text(json.dumps(summary, indent=1))
    print(f"docs: site written to {os.path.relpath(out)}/ ({len(warnings)} Sphinx warnings; "
          f"processing {t1 - t0:.0f} s, site {time.time() - t1:.0f} s)")
    return 0


if __name__ == "__main__": sys.exit(main())
