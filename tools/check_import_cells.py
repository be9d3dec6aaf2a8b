"""Fail on notebook cells that nbdev's docs processing would run on their own.

`nbdev-proc-nbs` (the step `nbdev-docs` runs before Quarto) executes only exported cells, cells with a top-level
`show_doc(...)` call and every cell that contains an `import` *anywhere* (nbdev.processors._do_eval walks the whole
syntax tree). A cell that mixes an import or a `show_doc` call with other code is therefore run without the cells
before it and fails (or, worse, runs slow test code at docs time). Rules checked here: outside exported cells, a
cell that contains an import holds only imports, and a cell with a top-level `show_doc` call holds only such calls.

Usage: python tools/check_import_cells.py [NOTEBOOK ...]   (default: every notebook under nbs/ except _/. folders)
"""
import ast, json, re, sys
from pathlib import Path

_dir = re.compile(r"^\s*#\s*\|\s*([\w-]+)(.*)$")

def directives(src):
    d = {}
    for line in src.splitlines():
        m = _dir.match(line)
        if m: d[m.group(1)] = m.group(2).strip(" :")
        elif line.strip() and not line.strip().startswith("#"): break
    return d

def _is_show_doc(n) -> bool:
    return isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", None) == "show_doc"


def bad_cells(path):
    nb = json.loads(Path(path).read_text())
    out = []
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] != "code": continue
        src = "".join(c["source"])
        d = directives(src)
        if d.keys() & {"export", "exports", "exporti", "exec_doc"} or d.get("eval", "").lower() == "false": continue
        # cell magics and shell lines are not Python: drop them before parsing
        code = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))
        try: tree = ast.parse(code)
        except SyntaxError: continue
        has_imp = any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        only_imp = all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body)
        if has_imp and not only_imp: out.append((i, src.splitlines()[:3])); continue
        # a top-level show_doc(...) call makes nbdev run the whole cell at docs time too
        if any(_is_show_doc(n) for n in tree.body) and not all(_is_show_doc(n) for n in tree.body):
            out.append((i, ["show_doc() beside other code:"] + src.splitlines()[:2]))
    return out

def main(paths):
    if not paths: paths = [p for p in sorted(Path("nbs").rglob("*.ipynb")) if not any(s.startswith(("_", ".")) for s in p.parts[1:])]
    n = 0
    for p in paths:
        for i, head in bad_cells(p):
            n += 1; print(f"{p}: cell {i} mixes imports or show_doc() with other code: {' | '.join(head)}")
    if n: print(f"FAIL: {n} cell(s) mix imports or show_doc() with other code; move the imports to the notebook's "
                "import cell and give show_doc calls a cell of their own"); return 1
    print("import cells: ok"); return 0

if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
