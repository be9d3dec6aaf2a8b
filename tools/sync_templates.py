"""Copy the report template(s) from nbs/templates/ (the source, edited and cleaned like every notebook) to
fatebook/templates/ (shipped in the package). `--check`: exit 1 if a shipped copy differs (tools/test.sh runs it).

Usage: python tools/sync_templates.py [--check]"""
import shutil, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
src, dst = root / "nbs" / "templates", root / "fatebook" / "templates"
check = "--check" in sys.argv[1:]
bad = []
for nb in sorted(src.glob("*.ipynb")):
    target = dst / nb.name
    if target.exists() and target.read_bytes() == nb.read_bytes(): continue
    if check: bad.append(nb.name); continue
    dst.mkdir(exist_ok=True); shutil.copyfile(nb, target); print(f"copied {nb.relative_to(root)} -> {target.relative_to(root)}")
extra = sorted({p.name for p in dst.glob("*.ipynb")} - {p.name for p in src.glob("*.ipynb")})
if check and (bad or extra):
    print(f"FAIL: fatebook/templates is out of sync with nbs/templates ({', '.join(bad + extra)}): "
          "run `python tools/sync_templates.py` and commit")
    sys.exit(1)
