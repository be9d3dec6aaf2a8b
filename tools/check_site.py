"""Static checks of the built documentation site (tools/docs.sh writes it; tests/test_docs.py runs these checks).

- every internal link, image, stylesheet and script of every page points to a file of the site, and every
  `#fragment` to an id on the target page (links to the published site's own URL count as broken: they should
  have been made internal);
- no page shows a Python traceback, or a machine path (`/work/`, `/tmp/`, home folders) outside code cells' inputs;
- no page shows an nbdev directive (`#| ...`), `default_exp` or `nbdev_export()`, or a line of a `#| hide` cell
  of its notebook (lines that also appear in a visible cell of that notebook are not counted).

Usage: python tools/check_site.py [SITE_DIR]   (default _site; uses SITE_DIR/_pages.json written by tools/docs.py)
"""
from __future__ import annotations
import json, re, sys
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

from html.parser import HTMLParser

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
_directive = re.compile(r"^\s*#\s?\|\s*[\w-]+")
_traceback = re.compile(r"Traceback \(most recent call last\)")
_dir_line = re.compile(r"^\s*#\s*\|\s*([\w-]+)")
SKIP_PAGES = ("_static/", "_sources/", "_images/")


def pages(site: Path) -> list[Path]:
    return sorted(p for p in Path(site).rglob("*.html") if not p.relative_to(site).as_posix().startswith(SKIP_PAGES))


class Page(HTMLParser):
    "One HTML page, parsed once: ids, references (tag, attribute, url), article text, code blocks, tracebacks."
    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.ids, self.refs, self.text, self.pres, self.tb_class = set(), [], [], [], []
        self.pre_input = []            # per pre: inside a code cell's input (not an output, signature or prose block)
        self._article = self._pre = self._skip = 0
        self._divs = []                # per open div: is it a cell_input
        self.feed(html); self.close()
        self.text = "".join(self.text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"): self.ids.add(a["id"])
        if tag == "a" and a.get("name"): self.ids.add(a["name"])
        for attr in ("href", "src"):
            if a.get(attr) and tag in ("a", "img", "link", "script", "source", "iframe"): self.refs.append((tag, attr, a[attr]))
        if tag == "article": self._article += 1
        if tag in ("script", "style"): self._skip += 1
        if tag == "div": self._divs.append("cell_input" in (a.get("class") or "").split())
        if tag == "pre":
            self._pre += 1
            if self._pre == 1 and self._article: self.pres.append([]); self.pre_input.append(any(self._divs))
        if "traceback" in (a.get("class") or "") and self._article: self.tb_class.append(tag)

    def handle_endtag(self, tag):
        if tag == "article": self._article = max(0, self._article - 1)
        if tag in ("script", "style"): self._skip = max(0, self._skip - 1)
        if tag == "pre": self._pre = max(0, self._pre - 1)
        if tag == "div" and self._divs: self._divs.pop()
        if tag in ("p", "div", "li", "tr", "h1", "h2", "h3", "h4", "br", "section") and self._article: self.text.append("\n")

    def handle_data(self, data):
        if self._article and not self._skip:
            self.text.append(data)
            if self._pre and self.pres: self.pres[-1].append(data)


@lru_cache(maxsize=512)
def _page(path: str, stamp: tuple) -> Page:
    p = Page(Path(path).read_text(errors="replace"))
    p.pres = ["".join(x) for x in p.pres]
    return p


def page(path) -> Page:
    "The parsed page, cached until the file changes (modification time in ns and size)."
    st = Path(path).stat(); return _page(str(path), (st.st_mtime_ns, st.st_size))


def ids(path: Path) -> set[str]: return page(path).ids


def broken_links(site, site_url: str | None = None) -> list[str]:
    "Internal references (a, img, link, script, source) that point to no file or to no id of the target page."
    site = Path(site).resolve()
    site_url = site_url or _site_url()
    out = []
    for pg in pages(site):
        rel = pg.relative_to(site).as_posix()
        for tag, attr, url in page(pg).refs:
            url = url.strip()
            if site_url and url.startswith(site_url):
                page_path = urlsplit(url[len(site_url):].lstrip("/")).path or "index.html"
                why = ("not to this one" if (site / page_path).is_file() else
                       f"and {page_path} is no page of this site (a doclink from fatebook/_modidx.py to a module whose "
                       "notebook is not in nbs/? nbdev-export rewrites the index)")
                out.append(f"{rel}: <{tag} {attr}={url!r}> points to the published site, {why}"); continue
            u = urlsplit(url)
            if u.scheme or url.startswith(("//", "mailto:", "javascript:", "data:")): continue
            target = pg if not u.path else (pg.parent / unquote(u.path)).resolve()
            if target.is_dir(): target = target / "index.html"
            try: target.relative_to(site)
            except ValueError:
                out.append(f"{rel}: <{tag} {attr}={url!r}> points outside the site"); continue
            if not target.is_file():
                out.append(f"{rel}: <{tag} {attr}={url!r}>: no such file"); continue
            if u.fragment and target.suffix == ".html" and unquote(u.fragment) not in ids(target):
                out.append(f"{rel}: <{tag} {attr}={url!r}>: no id {u.fragment!r} on {target.relative_to(site).as_posix()}")
    return out


def _site_url() -> str | None:
    try:
        import yaml
        return yaml.safe_load((ROOT / "nbs" / "nbdev.yml").read_text())["website"]["site-url"].rstrip("/")
    except Exception: return None


def tracebacks(site) -> list[str]:
    "Pages that show a Python traceback (stored error outputs, or tracebacks printed into an output)."
    out = []
    for pg in pages(site):
        rel, p = pg.relative_to(site).as_posix(), page(pg)
        m = _traceback.search(p.text)
        if p.tb_class or m:
            what = p.text[max(0, m.start() - 60): m.end() + 60] if m else f"<{p.tb_class[0]} class=...traceback...>"
            out.append(f"{rel}: Python traceback on the page: {what.strip()}".replace("\n", " | "))
    return out


def machine_paths(site) -> list[str]:
    """Machine paths (`/work/`, `/tmp/`, home folders) shown in an output, an API signature or a code block of the
    prose. Stored outputs are checked by tools/check_outputs.py; this also sees what the docs build itself writes
    (nbdev's show_doc runs at build time: a default value computed from the machine would show here)."""
    from check_outputs import _path
    out = []
    for pg in pages(site):
        rel, p = pg.relative_to(site).as_posix(), page(pg)
        for pre, is_input in zip(p.pres, p.pre_input):
            if is_input: continue
            for line in pre.splitlines():
                if _path.search(line): out.append(f"{rel}: machine path shown: {line.strip()[:120]}"); break
    return out


def _code_lines(src: str) -> set[str]:
    return {l.strip() for l in src.splitlines() if l.strip() and not _dir_line.match(l)}


def hidden_lines(nb_path: Path) -> set[str]:
    "Code lines of a notebook's `#| hide` cells that appear in none of its visible cells (specific enough to search)."
    nb = json.loads(Path(nb_path).read_text())
    hidden, visible = set(), set()
    for c in nb["cells"]:
        if c["cell_type"] != "code": continue
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        dirs = {m.group(1) for m in map(_dir_line.match, src.splitlines()) if m}
        if "hide" in dirs: hidden |= _code_lines(src)
        elif not dirs & {"export", "exporti", "exports", "default_exp"}: visible |= _code_lines(src)
    return {l for l in hidden - visible if len(l) >= 16 and not l.startswith("#")}


def leaks(site, page_of: dict[str, str] | None = None, nbs: Path | None = None) -> list[str]:
    """Directives, nbdev housekeeping and `#| hide` cells that show on a page. `page_of` maps notebooks (relative to
    `nbs`) to their page (docname); default: SITE/_pages.json written by tools/docs.py."""
    site = Path(site); nbs = Path(nbs or ROOT / "nbs")
    if page_of is None:
        f = site / "_pages.json"
        page_of = json.loads(f.read_text())["pages"] if f.exists() else {}
    nb_of = {doc + ".html": nb for nb, doc in page_of.items()}
    out = []
    for pg in pages(site):
        rel, p = pg.relative_to(site).as_posix(), page(pg)
        for pre in p.pres:
            for line in pre.splitlines():
                if _directive.match(line): out.append(f"{rel}: nbdev directive shown: {line.strip()[:100]}")
        for word in ("nbdev_export()", "nbdev.nbdev_export", "default_exp"):
            if word in p.text: out.append(f"{rel}: nbdev housekeeping shown: {word}")
        nb = nb_of.get(rel)
        if nb and (nbs / nb).exists():
            shown = {l.strip() for pre in p.pres for l in pre.splitlines()}
            for l in sorted(hidden_lines(nbs / nb) & shown):
                out.append(f"{rel}: a line of a `#| hide` cell of {nb} is shown: {l[:100]}")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = Path(argv[0] if argv else ROOT / "_site")
    problems = broken_links(site) + tracebacks(site) + machine_paths(site) + leaks(site)
    for p in problems: print(p)
    n = len(pages(site))
    print(f"FAIL: {len(problems)} problem(s) in {n} pages" if problems else f"site: {n} pages, links and contents ok")
    return 1 if problems else 0


if __name__ == "__main__": sys.exit(main())
