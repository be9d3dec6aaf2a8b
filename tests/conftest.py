"""Shared pytest fixtures for fatebook's tests.

Data (read-only, never copied into the repo): `../shared/data` relative to the repository root, or the directory
in the environment variable `FATEBOOK_DATA_DIR`. The pancreas file holds 2,000 of the original 27,998 genes
(see `../shared/data/README.md`).

Fixtures
- `data_dir` (session): the data directory (`pathlib.Path`); tests using it skip if it is absent.
- `dg50`, `dg100`, `dg200`: fresh copies of the preprocessed dentate-gyrus draws (50/100/200 cells; layers Ms,
  velocity; obsp connectivities; obs clusters, latent_time, dpt_pseudotime). `dentate_gyrus_path(n)` gives the file.
- `pancreas_pp_path` (session): the 2,531-cell pancreas run once through `fatebook.datasets.preprocess` (scVelo
  recipe: filter_and_normalize(min_shared_counts=20, n_top_genes=2000), PCA, neighbors(n_pcs=30, n_neighbors=30),
  moments, stochastic velocity, velocity graph, UMAP; plus `obs['dpt_pseudotime']` from a diffusion map rooted in
  'Ngn3 low EP'), cached as `.cache/pancreas_2531_pp_<recipe>.h5ad` so that fatebook and CellRank read the very
  same file. Until `fatebook.datasets.preprocess` is importable the same recipe runs inline with scVelo. Delete
  the file (or set FATEBOOK_REBUILD_CACHE=1) to rebuild. `pancreas_pp`: a fresh in-memory copy per test.
- `cellrank_python` (session): the Python of the CellRank 2.3.3 reference env `.venv-cellrank` (built by
  `tools/cellrank_env.sh` on first use, ~1 min with PyPI access). If it cannot be built, parity tests are skipped
  with the reason, except under CI (env `CI` set), where that is an error.
- `run_cellrank(script, **args) -> dict`: runs `tests/cellrank_ref/<script>.py` with the CellRank env in a
  subprocess and returns its results (numpy arrays, scipy CSR matrices, JSON values; see cellrank_ref/_refio.py).
"""
from __future__ import annotations
import fcntl, hashlib, json, os, subprocess, sys, tempfile, time, warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"
CELLRANK_REF = Path(__file__).resolve().parent / "cellrank_ref"
sys.path.insert(0, str(CELLRANK_REF))
import _refio  # noqa: E402  (protocol shared with the CellRank-side scripts)

PP_VERSION = "1"  # bump when the pancreas recipe below changes: the cache file name carries it


def find_data_dir() -> Path | None:
    "`FATEBOOK_DATA_DIR` if set, else `../shared/data` next to the repository (None if it does not exist)."
    env = os.environ.get("FATEBOOK_DATA_DIR")
    d = Path(env).expanduser() if env else (REPO.parent / "shared" / "data")
    return d.resolve() if d.is_dir() else None


DATA_DIR = find_data_dir()
if DATA_DIR is not None:  # so that fatebook.datasets' loaders find the shared copies too
    os.environ.setdefault("FATEBOOK_DATA_DIR", str(DATA_DIR))


def _need_data(name: str) -> Path:
    if DATA_DIR is None:
        pytest.skip("shared data not found: set FATEBOOK_DATA_DIR or place the data in ../shared/data "
                    "(see ../shared/data/README.md)")
    p = DATA_DIR / name
    if not p.exists(): pytest.skip(f"{p} not found (FATEBOOK_DATA_DIR={DATA_DIR})")
    return p


def _read(path):
    import anndata as ad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dentate-gyrus files use an old h5ad encoding
        return ad.read_h5ad(path)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if DATA_DIR is None: _need_data("")
    return DATA_DIR


# ---- dentate gyrus -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dentate_gyrus_path():
    "Factory: `dentate_gyrus_path(n)` -> path of the n-cell draw (n in 50, 100, 200)."
    def f(n: int) -> Path:
        if n not in (50, 100, 200): raise ValueError(f"n must be 50, 100 or 200, not {n!r}")
        return _need_data(f"dentate_gyrus_{n}.h5ad")
    return f


@pytest.fixture(scope="session")
def _dg_cache(dentate_gyrus_path):
    cache = {}
    def get(n):
        if n not in cache: cache[n] = _read(dentate_gyrus_path(n))
        return cache[n]
    return get


@pytest.fixture
def dg50(_dg_cache): return _dg_cache(50).copy()


@pytest.fixture
def dg100(_dg_cache): return _dg_cache(100).copy()


@pytest.fixture
def dg200(_dg_cache): return _dg_cache(200).copy()


# ---- preprocessed pancreas, cached once for fatebook and CellRank --------------------------------------------------
@contextmanager
def _file_lock(path: Path):
    "Inter-process lock (several engineers' pytest runs may build the cache at the same time)."
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try: yield
        finally: fcntl.flock(fh, fcntl.LOCK_UN)


def _preprocess_pancreas(adata):
    "The shared recipe; returns (preprocessed AnnData, recipe tag)."
    try:
        from fatebook.datasets import preprocess
    except ImportError:
        preprocess = None
    if preprocess is not None:
        a = preprocess(adata, min_shared_counts=20, n_top_genes=2000, n_pcs=30, n_neighbors=30, mode="stochastic",
                       velocity_graph=True, umap=True, seed=0)
        tag = "fatebook"
    else:
        import scanpy as sc, scvelo as scv
        a = adata.copy()
        scv.settings.verbosity = 0
        scv.pp.filter_and_normalize(a, min_shared_counts=20, n_top_genes=2000)
        sc.pp.pca(a, n_comps=30, random_state=0)
        sc.pp.neighbors(a, n_neighbors=30, n_pcs=30, random_state=0)
        scv.pp.moments(a, n_pcs=None, n_neighbors=None)
        scv.tl.velocity(a, mode="stochastic")
        scv.tl.velocity_graph(a, n_jobs=1, show_progress_bar=False)
        sc.tl.umap(a, random_state=0)
        tag = "scvelo"
    # a pseudotime both tools read for the PseudotimeKernel: DPT rooted at the 'Ngn3 low EP' cell at the far end of
    # the first diffusion component (the end away from the Beta cells); deterministic.
    import scanpy as sc
    sc.tl.diffmap(a, n_comps=15)
    dc1 = a.obsm["X_diffmap"][:, 1]
    cl = a.obs["clusters"].astype(str).to_numpy()
    sign = 1.0 if dc1[cl == "Beta"].mean() > dc1[cl == "Ngn3 low EP"].mean() else -1.0
    cand = np.flatnonzero(cl == "Ngn3 low EP")
    a.uns["iroot"] = int(cand[np.argmin(sign * dc1[cand])])
    sc.tl.dpt(a)
    return a, tag


def build_pancreas_pp(force: bool = False) -> Path:
    "Build (once) and return the path of the cached preprocessed pancreas (usable outside pytest, e.g. by bench/)."
    src = DATA_DIR / "pancreas_2531x2000.h5ad" if DATA_DIR is not None else None
    if src is None or not src.exists():
        raise FileNotFoundError("pancreas_2531x2000.h5ad not found: set FATEBOOK_DATA_DIR or place the data in "
                                "../shared/data (see ../shared/data/README.md)")
    force = force or os.environ.get("FATEBOOK_REBUILD_CACHE") == "1"
    with _file_lock(CACHE / "pancreas_pp.lock"):
        existing = sorted(CACHE.glob(f"pancreas_2531_pp_v{PP_VERSION}_*.h5ad"))
        if existing and not force:
            return max(existing, key=lambda p: p.stat().st_mtime)
        t0 = time.perf_counter()
        a, tag = _preprocess_pancreas(_read(src))
        out = CACHE / f"pancreas_2531_pp_v{PP_VERSION}_{tag}.h5ad"
        fd, tmp = tempfile.mkstemp(suffix=".h5ad", dir=CACHE); os.close(fd)
        a.write_h5ad(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)  # atomic: a reader never sees a half-written file
        from importlib.metadata import version   # (anndata and scanpy deprecate `__version__`)
        out.with_suffix(".json").write_text(json.dumps(dict(
            source=str(src), recipe=tag, pp_version=PP_VERSION, n_obs=a.n_obs, n_vars=a.n_vars,
            seconds=round(time.perf_counter() - t0, 1), anndata=version("anndata"), scanpy=version("scanpy"),
            scvelo=version("scvelo"), numpy=np.__version__), indent=1))
        return out


@pytest.fixture(scope="session")
def pancreas_pp_path() -> Path:
    _need_data("pancreas_2531x2000.h5ad")
    return build_pancreas_pp()


@pytest.fixture(scope="session")
def _pancreas_pp_session(pancreas_pp_path):
    return _read(pancreas_pp_path)


@pytest.fixture
def pancreas_pp(_pancreas_pp_session):
    "A fresh copy of the preprocessed pancreas (2,531 cells; 2,000 of the original genes, see the data README)."
    return _pancreas_pp_session.copy()


# ---- the CellRank 2.3.3 reference ----------------------------------------------------------------------------------
def cellrank_python_or_reason() -> tuple[Path | None, str]:
    "Build/check `.venv-cellrank` (quick when built). Returns (python path, '') or (None, why not)."
    venv = Path(os.environ.get("CELLRANK_VENV", REPO / ".venv-cellrank"))
    try:
        r = subprocess.run(["bash", str(REPO / "tools" / "cellrank_env.sh")], cwd=REPO, capture_output=True,
                           text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"tools/cellrank_env.sh could not run: {e}"
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-8:])
        return None, f"the CellRank 2.3.3 env could not be built (tools/cellrank_env.sh exit {r.returncode}):\n{tail}"
    py = venv / "bin" / "python"
    return (py, "") if py.exists() else (None, f"{py} missing after tools/cellrank_env.sh")


@pytest.fixture(scope="session")
def cellrank_python() -> Path:
    py, why = cellrank_python_or_reason()
    if py is None:
        if os.environ.get("CI"): pytest.fail(f"CI must run the parity tests, but: {why}")
        pytest.skip(why)
    return py


def _cache_key(path: Path, python, args_json: str) -> str:
    "Hash of the script (+ _refio), its arguments, the input files' size/mtime and the CellRank env's pins."
    h = hashlib.sha256()
    for f in (path, CELLRANK_REF / "_refio.py"): h.update(f.read_bytes())
    h.update(args_json.encode())
    for v in json.loads(args_json).values():
        for p in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(p, str) and p.endswith(".h5ad") and Path(p).exists():
                st = Path(p).stat(); h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    pins = Path(python).parent.parent / ".cellrank-pins"
    if pins.exists(): h.update(pins.read_bytes())
    return h.hexdigest()[:16]


def run_cellrank_script(python, script: str, timeout: float = 1800, **args) -> dict:
    """Run `tests/cellrank_ref/<script>.py` with `python` (the CellRank env) on `args` (JSON-able) and return its
    results. Raises RuntimeError with the script's output tail if it fails.

    By default CellRank runs every time. For quick local iterations, FATEBOOK_CELLRANK_CACHE=1 keeps the outputs
    under .cache/cellrank_ref/<hash of script, args, input files, env pins>/ and reuses them (still computed by
    CellRank on this machine, never pasted; CI leaves it off)."""
    path = CELLRANK_REF / (script if script.endswith(".py") else f"{script}.py")
    if not path.exists(): raise FileNotFoundError(f"no reference script {path}")
    args_json = json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}, sort_keys=True)
    cached = None
    if os.environ.get("FATEBOOK_CELLRANK_CACHE") == "1":
        cached = CACHE / "cellrank_ref" / f"{path.stem}-{_cache_key(path, python, args_json)}"
        if (cached / "results.json").exists(): return _refio.load(cached)
    with tempfile.TemporaryDirectory(prefix="cellrank_ref_") as tmp:
        tmp = Path(tmp)
        (tmp / "args.json").write_text(args_json)
        env = dict(os.environ, PYTHONWARNINGS="ignore", NUMBA_CACHE_DIR=str(CACHE / "numba-cellrank"))
        for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"): env.pop(k, None)
        r = subprocess.run([str(python), str(path), str(tmp / "args.json"), str(tmp / "out")], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=REPO)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-30:])
            raise RuntimeError(f"CellRank reference script {path.name} failed (exit {r.returncode}):\n{tail}")
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            if not cached.exists():
                import shutil
                part = cached.with_name(cached.name + f".part{os.getpid()}")
                shutil.copytree(tmp / "out", part)
                os.replace(part, cached)  # same filesystem: atomic
            return _refio.load(cached)
        return _refio.load(tmp / "out")


@pytest.fixture(scope="session")
def run_cellrank(cellrank_python):
    "`run_cellrank(script, **args) -> dict`: run a tests/cellrank_ref script in the CellRank 2.3.3 env."
    def f(script: str, **args) -> dict:
        return run_cellrank_script(cellrank_python, script, **args)
    return f
