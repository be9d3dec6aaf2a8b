"""Execute notebooks in place so that their outputs (printed results, tables, figures) are stored for the docs.

    .venv/bin/python tools/exec_nbs.py nbs/04_fate.ipynb [nbs/tutorials/pancreas.ipynb ...]

The same way for everyone (owners, the lead's final pass):
- a fresh kernel running this interpreter (`.venv`'s Python), started in the notebook's folder;
- `FATEBOOK_DATA_DIR` set (default: `../shared/data` next to the repository, when it exists), `PYTHONHASHSEED=0`,
  `TQDM_DISABLE=1` (tqdm bars that a call does not switch on explicitly stay off),
  `random` and `numpy.random` seeded with 0 before the first cell; `MPLBACKEND` removed, so figures are stored
  inline as PNG at 100 dpi (a throw-away IPython profile: the user's own profile and startup files are not used);
- cells marked `#| eval: false` are not run (as in nbdev and Quarto: the hidden `nbdev_export()` cell would
  otherwise export every notebook of the tree); `--skip-flags slow petsc` also skips cells with those flags, and
  `#| petsc` cells are skipped when petsc4py is not installed;
- a cell running longer than `--timeout` seconds (default 600) stops the run;
- no widget state is stored (it would be every widget model of the run, image blobs included) and widget views are
  replaced by their static fallback (text, HTML or image): that is what JupyterLab without a kernel, GitHub and the
  documentation site can show.
On an error the notebook file is left exactly as it was (nothing is written) and the traceback is printed.
On success the notebook is written atomically, cleaned with nbdev-clean (outputs kept), and its stored outputs are
checked by tools/check_outputs.py (tracebacks, stderr warnings, progress bars, machine paths, huge images).
"""
from __future__ import annotations
import argparse, json, os, re, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
_dir = re.compile(r"^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

KERNEL_CONFIG = """c.InlineBackend.figure_formats = {"png"}
c.InlineBackend.rc = {"figure.dpi": 100}
"""
STARTUP = """import random as _fb_random
_fb_random.seed(0)
try:
    import numpy as _fb_np
    _fb_np.random.seed(0)
    del _fb_np
except ImportError: pass
del _fb_random
"""


def directives(src: str) -> dict:
    d = {}
    for line in src.splitlines():
        m = _dir.match(line)
        if m: d[m.group(1).lower()] = m.group(2).strip().strip("'\"").lower()
        elif line.strip(): break
    return d


def skip_cell(cell, flags: set) -> bool:
    if cell.get("cell_type") != "code": return False
    d = directives("".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"])
    return d.get("eval") == "false" or bool(flags & set(d))


def environment(tmp: Path) -> dict:
    "The kernel's environment: data folder, seeds, inline figures, a private IPython profile and kernelspec."
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    env["PYTHONHASHSEED"] = "0"
    env.setdefault("TQDM_DISABLE", "1")   # progress bars (scVelo's among them) are noise in stored outputs
    if not env.get("FATEBOOK_DATA_DIR") and (ROOT.parent / "shared" / "data").is_dir():
        env["FATEBOOK_DATA_DIR"] = str((ROOT.parent / "shared" / "data").resolve())
    prof = tmp / "ipython" / "profile_default"
    (prof / "startup").mkdir(parents=True)
    (prof / "ipython_kernel_config.py").write_text(KERNEL_CONFIG)
    (prof / "startup" / "00-fatebook-seed.py").write_text(STARTUP)
    env["IPYTHONDIR"] = str(tmp / "ipython")
    kdir = tmp / "jupyter" / "kernels" / "fatebook-exec"
    kdir.mkdir(parents=True)
    (kdir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (fatebook exec)", "language": "python"}))
    env["JUPYTER_PATH"] = str(tmp / "jupyter")
    return env


def _stop(client):
    "Kill what is left of the kernel's process group (a cell stuck in C code can outlive the shutdown request)."
    import signal
    pgid = getattr(client, "pgid", None)
    if pgid:
        try: os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError): pass


def execute(path: Path, timeout: int, flags: set) -> tuple[bool, str]:
    "Execute one notebook; write it only if every cell ran. Returns (ok, message)."
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    class Client(NotebookClient):
        pgid = None

        async def async_start_new_kernel(self, **kw):
            await super().async_start_new_kernel(**kw)
            proc = getattr(getattr(self.km, "provisioner", None), "process", None)
            if proc is not None: self.pgid = os.getpgid(proc.pid)   # jupyter_client starts kernels in a new session

        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if skip_cell(cell, flags):
                cell.outputs = []; cell.execution_count = None; return cell
            return await super().async_execute_cell(cell, cell_index, execution_count, store_history)

    nb = nbformat.read(path, as_version=4)
    kernelspec = nb.metadata.get("kernelspec")
    with tempfile.TemporaryDirectory(prefix="fatebook-exec-") as tmp:
        env = environment(Path(tmp))
        saved = dict(os.environ)
        os.environ.clear(); os.environ.update(env)       # the kernel manager passes os.environ to the kernel
        try:
            from traitlets.config import Config
            cfg = Config()
            cfg.KernelManager.transport = "ipc"                 # unix sockets in the temporary folder, not TCP
            cfg.KernelManager.ip = str(Path(tmp) / "kernel")
            # no widget state: it is every model of the run (PNG blobs of figure widgets included, > 1 MB for a
            # widgets notebook) and nbdev-clean keeps it; the static fallback of each view is stored instead
            client = Client(nb, config=cfg, timeout=timeout, kernel_name="fatebook-exec", record_timing=False,
                            store_widget_state=False, resources={"metadata": {"path": str(path.parent.resolve())}})
            try: client.execute()                                # nbclient shuts the kernel down it started ...
            finally: _stop(client)                               # ... and we make sure of it, children included
        except (CellExecutionError, CellTimeoutError) as e:
            lines = _ansi.sub("", str(e)).splitlines()
            return False, "\n".join(lines if len(lines) <= 60 else lines[:12] + ["[...]"] + lines[-40:])
        finally:
            os.environ.clear(); os.environ.update(saved)
    if kernelspec: nb.metadata["kernelspec"] = kernelspec
    else: nb.metadata.pop("kernelspec", None)
    nb.metadata.pop("widgets", None)        # state of an earlier run: its models are gone with that kernel
    for c in nb.cells: c["outputs"] = static_outputs(c.get("outputs", []))
    tmpf = path.with_name(f".{path.name}.exec-tmp")
    nbformat.write(nb, tmpf)
    os.replace(tmpf, path)
    return True, ""


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def static_outputs(outputs: list) -> list:
    """Outputs without their live widget views: with no widget state stored, JupyterLab would show 'Error displaying
    widget: model not found' in their place; the static representations beside them (text, HTML, PNG) are kept, and
    a view with nothing else to show is dropped."""
    out = []
    for o in outputs:
        data = o.get("data") or {}
        if WIDGET_VIEW not in data: out.append(o); continue
        data = {k: v for k, v in data.items() if k != WIDGET_VIEW}
        if data: o["data"] = data; out.append(o)
    return out


def clean(path: Path):
    "nbdev-clean the notebook (outputs are kept: the project does not set clear_all)."
    from nbdev.clean import nbdev_clean
    cwd = os.getcwd(); os.chdir(ROOT)
    try: nbdev_clean(fname=str(path))
    finally: os.chdir(cwd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebooks", nargs="+", help="notebooks to execute in place")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    ap.add_argument("--skip-flags", nargs="*", default=[], help="also skip cells with these nbdev flags (e.g. slow petsc)")
    ap.add_argument("--no-check", action="store_true", help="do not check the stored outputs afterwards")
    a = ap.parse_args(argv)
    from check_outputs import check_notebook
    flags = set(a.skip_flags)
    try: import petsc4py  # noqa: F401
    except ImportError:
        flags.add("petsc"); print("petsc4py is not installed: cells marked `#| petsc` are skipped (bash tools/setup.sh builds it)")
    failed = 0
    for p in map(Path, a.notebooks):
        if not p.exists(): print(f"{p}: no such notebook"); failed += 1; continue
        t0 = time.time()
        ok, msg = execute(p, a.timeout, flags)
        if not ok:
            print(f"{p}: FAILED after {time.time() - t0:.0f} s; the notebook was not changed.\n{msg}"); failed += 1; continue
        clean(p)
        problems, n = ([], None) if a.no_check else check_notebook(p)
        print(f"{p}: executed in {time.time() - t0:.0f} s" + (f"; {n['with_outputs']} of {n['code']} code cells "
              f"with outputs, {n['images']} image(s)" if n else ""))
        for pr in problems: print(f"  {pr}")
        for w in (n or {}).get("notes", []): print(f"  (allowed, the library's own log) {w}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__": sys.exit(main())
