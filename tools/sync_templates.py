"""Keep the report template(s) in step with the package:
1. the `parameters` cell of nbs/templates/*.ipynb (the source, edited and cleaned like every notebook) is generated
   from `fatebook.reports.PARAMS` (`fatebook.reports.parameters_source()`): names, defaults and help texts;
2. nbs/templates/*.ipynb are copied to fatebook/templates/ (shipped in the package).
`--check`: change nothing; exit 1 if either is out of date (tools/test.sh runs it).

Usage: python tools/sync_templates.py [--check]"""
import json, shutil, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root))
from fatebook.reports import parameters_source  # noqa: E402

src, dst = root / "nbs" / "templates", root / "fatebook" / "templates"
check = "--check" in sys.argv[1:]
bad = []
for nb_path in sorted(src.glob("*.ipynb")):
    nb = json.loads(nb_path.read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        print(f"FAIL: {nb_path.relative_to(root)} needs exactly one cell tagged `parameters` (found {len(cells)})")
        sys.exit(1)
    want = parameters_source()
    if "".join(cells[0]["source"]) != want:
        if check: bad.append(f"{nb_path.name} (parameters cell differs from fatebook.reports.PARAMS)")
        else:
            cells[0]["source"] = want.splitlines(keepends=True)
            nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            subprocess.run([str(Path(sys.executable).with_name("nbdev-clean")), "--fname", str(nb_path)], check=True)
            print(f"rewrote the parameters cell of {nb_path.relative_to(root)} from PARAMS")
    target = dst / nb_path.name
    if target.exists() and target.read_bytes() == nb_path.read_bytes(): continue
    if check: bad.append(nb_path.name); continue
    dst.mkdir(exist_ok=True); shutil.copyfile(nb_path, target)
    print(f"copied {nb_path.relative_to(root)} -> {target.relative_to(root)}")
extra = sorted({p.name for p in dst.glob("*.ipynb")} - {p.name for p in src.glob("*.ipynb")})
if check and (bad or extra):
    print(f"FAIL: the report templates are out of date ({', '.join(bad + extra)}): "
          "run `python tools/sync_templates.py` and commit nbs/templates and fatebook/templates")
    sys.exit(1)
