"""Write README.md from nbs/index.ipynb (what `nbdev-readme` does, without Quarto, which these machines lack).

Usage: python tools/make_readme.py [--check]   (--check: exit 1 if README.md is out of date)
Hidden cells (`#| hide`) are dropped, nbdev directives stripped, stored outputs kept as text. Relative links are
written from the notebook's folder (nbs/, where the site is built) to the repository's root, where README.md is.
"""
import re, sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]

def _link(m) -> str:
    "A relative link to a file under nbs/, as seen from the repository's root (others as they are)."
    target = m.group(2)
    path = target.split("#")[0]
    return f"{m.group(1)}nbs/{target})" if path and (ROOT/"nbs"/path).exists() else m.group(0)

def render() -> str:
    nb = nbformat.read(ROOT/"nbs"/"index.ipynb", as_version=4)
    out = ["<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->", ""]
    for c in nb.cells:
        src = c.source
        if c.cell_type == "markdown":
            if src.startswith("# ") and "\n> " in src:          # title + subtitle
                title, sub = src.split("\n> ", 1)
                out += [title, "", f"> {sub.strip()}", ""]
            else:
                out += [re.sub(r"(\]\()(?![a-z]+:|#|/)([^)\s]+)\)", _link, src.strip()), ""]
            continue
        lines = src.splitlines()
        if any(l.strip() in ("#| hide", "#|hide") for l in lines): continue
        code = "\n".join(l for l in lines if not l.lstrip().startswith("#|")).strip()
        if code: out += ["```python", code, "```", ""]
        for o in c.get("outputs", []):
            text = o.get("text") if o.output_type == "stream" else (o.get("data", {}).get("text/plain") if "data" in o else None)
            if o.output_type == "stream" and o.get("name") == "stderr": continue
            if text: out += ["```", "".join(text).rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"

if __name__ == "__main__":
    text, readme = render(), ROOT/"README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`"); sys.exit(1)
        print("README.md is in sync with nbs/index.ipynb")
    else:
        readme.write_text(text); print(f"wrote {readme}")
