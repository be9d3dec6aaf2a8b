"""Check the outputs stored in the notebooks: what the documentation site shows must be clean (issue 12).

Fails on: error outputs and Python tracebacks; Python warnings on stderr (`warnings.warn` output) and
progress bars (their timings change every run); machine paths (`/work/`, `/root/`, `/tmp/`, `/home/...`) in any
text output; images over MAX_IMAGE_KB or MAX_IMAGE_PX on a side; widget state in the notebook's metadata over
MAX_WIDGET_STATE_KB (nbdev-clean keeps it; tools/exec_nbs.py stores none) and widget views whose state is not stored
(JupyterLab shows an error in their place). fatebook's own log lines on stderr ("Adding
`adata.obsm[...]`", and `WARNING: ...` lines, which an example may show on purpose) are allowed; `-v` lists the
warnings.
Reports (does not fail on) the notebooks that store no outputs at all.

Usage: python tools/check_outputs.py [NOTEBOOK ...]   (default: every notebook under nbs/ outside _ and . folders)
       --strict-missing   also fail on notebooks without stored outputs
"""
from __future__ import annotations
import argparse, base64, json, re, struct, sys
from pathlib import Path

MAX_IMAGE_KB = 500
MAX_IMAGE_PX = 2400
MAX_WIDGET_STATE_KB = 10        # notebook metadata `widgets`: a few plain controls' state; never image blobs
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_traceback = re.compile(r"Traceback \(most recent call last\)|^-{20,}\n\w+(Error|Exception)\b", re.M)
_warning = re.compile(r"^(.*:\d+: )?\w*Warning: |\bwarnings\.warn\(", re.M)   # Python's warnings module
_logwarn = re.compile(r"^WARNING: ", re.M)                                    # fatebook's (and scanpy's) log
_progress = re.compile(r"\d+(\.\d+)?\s*(it|s)/(s|it)\]|\|[\u2588\u2589\u258a\u258b\u258c\u258d\u258e\u258f #]{3,}\|")
_path = re.compile(r"(?<![\w.])(/work/|/root/|/tmp/|/home/[\w.-]+/|/Users/[\w.-]+/|[A-Z]:\\\\Users\\\\)")
_dir_line = re.compile(r"^\s*#\s*\|\s*([\w-]+)")


def _text(x) -> str: return "".join(x) if isinstance(x, list) else (x or "")


def notebooks(paths=None) -> list[Path]:
    root = Path(__file__).resolve().parent.parent / "nbs"
    if paths: return [Path(p) for p in paths]
    return [p for p in sorted(root.rglob("*.ipynb")) if not any(s.startswith(("_", ".")) for s in p.relative_to(root).parts)]


def png_size(b: bytes) -> tuple[int, int]:
    return struct.unpack(">II", b[16:24]) if b[:8] == b"\x89PNG\r\n\x1a\n" else (0, 0)


def check_notebook(path) -> tuple[list[str], dict]:
    """Problems of one notebook's stored outputs, and counts (code cells, cells with outputs, images) with `notes`:
    the library's own `WARNING:` log lines, allowed (an example may show one on purpose) but listed."""
    nb = json.loads(Path(path).read_text())
    problems, notes, n_code, n_out, n_img = [], [], 0, 0, 0
    state = ((nb.get("metadata") or {}).get("widgets") or {}).get("application/vnd.jupyter.widget-state+json") or {}
    kb = len(json.dumps((nb.get("metadata") or {}).get("widgets") or {})) / 1024
    if kb > MAX_WIDGET_STATE_KB:
        problems.append(f"notebook metadata: {kb:.0f} KB of widget state (max {MAX_WIDGET_STATE_KB} KB; nbdev-clean keeps "
                        "it): re-execute with tools/exec_nbs.py, which stores none, or turn off JupyterLab's "
                        "'Save Widget State Automatically' and save again")
    models = set((state.get("state") or {}))
    for i, c in enumerate(nb.get("cells", [])):
        if c.get("cell_type") != "code": continue
        n_code += 1
        outs = c.get("outputs") or []
        if outs: n_out += 1
        where = f"cell {i}"
        for o in outs:
            t = o.get("output_type")
            if t == "error":
                problems.append(f"{where}: error output {o.get('ename')}: {o.get('evalue', '')[:120]}"); continue
            texts = []
            if t == "stream":
                s = _text(o.get("text"))
                texts.append(s)
                if o.get("name") == "stderr":
                    m = _warning.search(s)
                    if m: problems.append(f"{where}: warning on stderr: {_line(s, m)}")
                    notes += [f"{where}: {_line(s, m)}" for m in _logwarn.finditer(s)]
            if any(_progress.search(_text(x)) for x in ([o.get("text")] if t == "stream" else [(o.get("data") or {}).get("text/plain")])):
                widget = "application/vnd.jupyter.widget-view+json" in (o.get("data") or {})
                problems.append(f"{where}: progress bar in the output{' (a tqdm widget)' if widget else ''}: its timings "
                                "change every run; turn progress bars off in that call (e.g. show_progress=False)")
            view = (o.get("data") or {}).get(WIDGET_VIEW)
            if isinstance(view, dict) and view.get("model_id") and view["model_id"] not in models:
                problems.append(f"{where}: a widget view with no stored state (JupyterLab shows 'Error displaying widget: "
                                "model not found'): re-execute with tools/exec_nbs.py, which stores its static fallback")
            for mime, v in (o.get("data") or {}).items():
                if mime.startswith("image/"):
                    n_img += 1
                    if mime == "image/svg+xml": size = len(_text(v).encode())
                    else:
                        try: raw = base64.b64decode(_text(v))
                        except Exception: problems.append(f"{where}: {mime} is not valid base64"); continue
                        size = len(raw)
                        w, h = png_size(raw)
                        if max(w, h) > MAX_IMAGE_PX: problems.append(f"{where}: image {w} x {h} px (max {MAX_IMAGE_PX}): smaller figsize or dpi")
                    if size > MAX_IMAGE_KB * 1024: problems.append(f"{where}: image of {size // 1024} KB (max {MAX_IMAGE_KB} KB): smaller figure, dpi <= 100, or fewer points")
                elif mime.startswith("text/") or mime.endswith("json"):
                    texts.append(_text(v) if not isinstance(v, dict) else json.dumps(v))
            for s in texts:
                m = _traceback.search(s)
                if m: problems.append(f"{where}: Python traceback in the output: {_line(s, m)}")
                m = _path.search(s)
                if m: problems.append(f"{where}: machine path in the output: {_line(s, m)}")
    return problems, {"code": n_code, "with_outputs": n_out, "images": n_img, "notes": notes}


def _rel(p) -> str:
    p = Path(p).resolve(); root = Path(__file__).resolve().parent.parent
    return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)


def _line(s: str, m) -> str:
    a = s.rfind("\n", 0, m.start()) + 1; b = s.find("\n", m.end())
    return s[a: b if b >= 0 else None].strip()[:160]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="*")
    ap.add_argument("-v", "--verbose", action="store_true", help="also list the library's WARNING log lines")
    ap.add_argument("--strict-missing", action="store_true", help="fail on notebooks that store no outputs")
    a = ap.parse_args(argv)
    bad, missing = 0, []
    for p in notebooks(a.notebooks):
        problems, n = check_notebook(p)
        rel = _rel(p)
        for pr in problems: print(f"{rel}: {pr}")
        if a.verbose:
            for w in n["notes"]: print(f"{rel}: (allowed) {w}")
        bad += len(problems)
        if n["code"] and not n["with_outputs"]: missing.append(rel)
    if missing: print(f"no stored outputs ({len(missing)}): {', '.join(missing)}  (execute with tools/exec_nbs.py)")
    if bad: print(f"FAIL: {bad} problem(s) in stored outputs; fix the code or the notebook, re-execute with tools/exec_nbs.py"); return 1
    if missing and a.strict_missing: print("FAIL: notebooks without stored outputs"); return 1
    print("stored outputs: ok"); return 0


if __name__ == "__main__": sys.exit(main())
