"""Tiny I/O protocol between tests/conftest.py (fatebook's env) and the scripts of tests/cellrank_ref/ (run in the
CellRank 2.3.3 env, `.venv-cellrank`). Standard library + numpy/scipy only, so it imports in both environments.

A script is called as `python SCRIPT.py ARGS_JSON OUT_DIR` and writes to OUT_DIR:
  arrays.npz     dense numpy arrays (one entry per result name)
  NAME.csr.npz   one file per scipy.sparse result (scipy.sparse.save_npz)
  results.json   everything else (numbers, strings, lists, dicts)
`run(fn)` does the argument parsing and the saving; `load(out_dir)` reads the three back into one dict.
"""
import json, sys, time
from pathlib import Path
import numpy as np
import scipy.sparse as sp


def _jsonable(v):
    if isinstance(v, dict): return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)): return [_jsonable(x) for x in v]
    if isinstance(v, np.generic): return v.item()
    return v


def save(out_dir, results: dict):
    out = Path(out_dir); out.mkdir(parents=True, exist_ok=True)
    arrays, other = {}, {}
    for k, v in results.items():
        if sp.issparse(v): sp.save_npz(out/f"{k}.csr.npz", sp.csr_matrix(v), compressed=False)
        elif isinstance(v, np.ndarray): arrays[k] = v
        else: other[k] = _jsonable(v)
    np.savez(out/"arrays.npz", **arrays)
    (out/"results.json").write_text(json.dumps(other, indent=1))


def load(out_dir) -> dict:
    out = Path(out_dir); res = {}
    if (out/"results.json").exists(): res.update(json.loads((out/"results.json").read_text()))
    if (out/"arrays.npz").exists():
        with np.load(out/"arrays.npz", allow_pickle=False) as z: res.update({k: z[k] for k in z.files})
    for f in sorted(out.glob("*.csr.npz")): res[f.name[:-len(".csr.npz")]] = sp.load_npz(f).tocsr()
    return res


def run(fn):
    "Entry point of a reference script: `fn(**args) -> dict` of results; timings go to results['_seconds']."
    if len(sys.argv) != 3: sys.exit(f"usage: {sys.argv[0]} ARGS_JSON OUT_DIR")
    args = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    res = fn(**args)
    res.setdefault("_seconds", time.perf_counter() - t0)
    save(sys.argv[2], res)
