"""Test helpers shared by fatebook's test files.

- `assert_adata_equal(a, b)`: deep comparison of two AnnData objects — X, obs/var (values, dtypes, categories, index),
  obsm/varm/obsp/varp/layers (dense or sparse, NaN-aware, dtype included), uns (recursively), raw — with a message
  naming the first difference.
- `unchanged(adata, *estimators)`: context manager; the AnnData (deep) and the estimators' results must be exactly
  as before when the block ends, whether it raised or not. Typical use:

      with unchanged(adata, g), pytest.raises(ValueError, match="n_states"):
          g.compute_macrostates(n_states=100)

- `estimator_state(g)` / `assert_estimator_equal(s0, s1)`: a snapshot of every public result of an estimator.
- `capture_log()`: context manager collecting the messages of fatebook's logger (info, debug, warnings) as a list.
"""
from __future__ import annotations
import copy, logging
from contextlib import contextmanager

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["assert_adata_equal", "assert_value_equal", "unchanged", "estimator_state", "assert_estimator_equal",
           "capture_log", "RESULT_ATTRS", "build_pancreas_dynamical"]


def _np_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype: return False
    if a.dtype.kind in "fc": return bool(np.array_equal(a, b, equal_nan=True))
    if a.dtype.kind == "O":
        return all(assert_value_equal(x, y, "", raise_=False) for x, y in zip(a.ravel(), b.ravel()))
    return bool(np.array_equal(a, b))


def assert_value_equal(a, b, where: str = "value", raise_: bool = True) -> bool:
    "Deep equality of nested dicts/lists/arrays/sparse matrices/DataFrames/Series/scalars (NaN == NaN, dtypes must match)."
    def fail(why):
        if raise_: raise AssertionError(f"{where}: {why}")
        return False
    if type(a) is not type(b) and not (isinstance(a, (np.generic, int, float, str, bool)) and
                                       isinstance(b, (np.generic, int, float, str, bool))):
        return fail(f"types differ: {type(a).__name__} vs {type(b).__name__}")
    import anndata
    if isinstance(a, anndata.AnnData):
        try: assert_adata_equal(a, b, where)
        except AssertionError:
            if raise_: raise
            return False
        return True
    if sp.issparse(a):
        if a.shape != b.shape or a.dtype != b.dtype or a.format != b.format:
            return fail(f"sparse shape/dtype/format differ: {a.shape} {a.dtype} {a.format} vs {b.shape} {b.dtype} {b.format}")
        d = (a != b)
        if d.nnz:
            A, B = a.toarray(), b.toarray()
            if not np.array_equal(A, B, equal_nan=True): return fail("sparse values differ")
        return True
    if isinstance(a, pd.DataFrame):
        try: pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError as e: return fail(f"DataFrames differ: {e}")
        return True
    if isinstance(a, pd.Series):
        try: pd.testing.assert_series_equal(a, b, check_exact=True)
        except AssertionError as e: return fail(f"Series differ: {e}")
        return True
    if isinstance(a, pd.Index):
        if not a.equals(b) or a.dtype != b.dtype: return fail("indexes differ")
        return True
    if isinstance(a, dict):
        if set(a) != set(b): return fail(f"keys differ: only in before {sorted(set(a) - set(b), key=str)}, "
                                         f"only in after {sorted(set(b) - set(a), key=str)}")
        return all(assert_value_equal(a[k], b[k], f"{where}[{k!r}]", raise_) for k in a)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b): return fail(f"lengths differ: {len(a)} vs {len(b)}")
        return all(assert_value_equal(x, y, f"{where}[{i}]", raise_) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, np.ndarray):
        if not _np_equal(a, b): return fail(f"arrays differ (shape {a.shape} vs {np.shape(b)}, dtype {a.dtype} vs {np.asarray(b).dtype})")
        return True
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b): return True
    try: eq = a == b
    except Exception as e: return fail(f"cannot compare: {e}")
    if isinstance(eq, np.ndarray): eq = eq.all()
    if not eq: return fail(f"{a!r} != {b!r}")
    return True


def assert_adata_equal(a, b, where: str = "adata"):
    "Raise AssertionError naming the first difference between AnnData `a` and `b` (every slot, deeply)."
    assert a.shape == b.shape, f"{where}: shapes differ {a.shape} vs {b.shape}"
    assert_value_equal(a.obs_names, b.obs_names, f"{where}.obs_names")
    assert_value_equal(a.var_names, b.var_names, f"{where}.var_names")
    if a.X is None or b.X is None: assert a.X is None and b.X is None, f"{where}.X: one is None"
    else: assert_value_equal(a.X, b.X, f"{where}.X")
    assert_value_equal(a.obs, b.obs, f"{where}.obs")
    assert_value_equal(a.var, b.var, f"{where}.var")
    for slot in ("obsm", "varm", "obsp", "varp", "layers"):
        A, B = getattr(a, slot), getattr(b, slot)
        assert set(A.keys()) == set(B.keys()), (f"{where}.{slot}: keys differ: only before {sorted(set(A.keys()) - set(B.keys()))}, "
                                                f"only after {sorted(set(B.keys()) - set(A.keys()))}")
        for k in A.keys(): assert_value_equal(A[k], B[k], f"{where}.{slot}[{k!r}]")
    assert_value_equal(dict(a.uns), dict(b.uns), f"{where}.uns")
    assert (a.raw is None) == (b.raw is None), f"{where}.raw: present in one only"
    if a.raw is not None:
        assert_value_equal(a.raw.X, b.raw.X, f"{where}.raw.X"); assert_value_equal(a.raw.var, b.raw.var, f"{where}.raw.var")


RESULT_ATTRS = ("eigendecomposition", "schur_vectors", "schur_matrix", "macrostates", "macrostates_memberships",
                "coarse_T", "coarse_initial_distribution", "coarse_stationary_distribution", "terminal_states",
                "terminal_states_probabilities", "terminal_states_memberships", "initial_states",
                "initial_states_probabilities", "initial_states_memberships", "fate_probabilities", "absorption_times",
                "lineage_drivers", "params")


def _snap(v):
    if v is None: return None
    if hasattr(v, "names") and hasattr(v, "colors") and isinstance(v, np.ndarray):   # a Lineage
        return dict(X=np.array(v, copy=True), names=list(v.names), colors=list(v.colors))
    return copy.deepcopy(v)


def estimator_state(g) -> dict:
    "Snapshot of every public result of an estimator (deep copies; `Lineage` as values, names and colours)."
    return {a: _snap(getattr(g, a, None)) for a in RESULT_ATTRS}


def assert_estimator_equal(s0: dict, s1: dict, where: str = "estimator"):
    for a in RESULT_ATTRS: assert_value_equal(s0[a], s1[a], f"{where}.{a}")


@contextmanager
def unchanged(adata, *estimators):
    "The AnnData and the estimators' results must be exactly as before when the block ends (raised or not)."
    before = adata.copy()
    states = [estimator_state(g) for g in estimators]
    try:
        yield
    finally:
        assert_adata_equal(before, adata)
        for i, (g, s) in enumerate(zip(estimators, states)):
            assert_estimator_equal(s, estimator_state(g), f"estimator {i} ({type(g).__name__})")


class _ListHandler(logging.Handler):
    def __init__(self, out, level): super().__init__(level); self.out = out
    def emit(self, record): self.out.append(record.getMessage())


@contextmanager
def capture_log(level=logging.DEBUG):
    "Collect fatebook's log messages (at `level` and above) in a list: `with capture_log() as log: ...; assert any('WARNING' in m for m in log)`."
    from fatebook.core import logger, settings
    out = []; h = _ListHandler(out, level)
    old_v = settings.verbosity
    if level <= logging.DEBUG: settings.verbosity = 2
    logger.addHandler(h)
    try:
        yield out
    finally:
        logger.removeHandler(h); settings.verbosity = old_v


# ---- pancreas with scVelo's dynamical model (the tutorial's input), cached -----------------------------------------
DYNAMICAL_VERSION = "1"  # bump when the recipe below changes: the cache file name carries it


def build_pancreas_dynamical(force: bool = False, path=None):
    """The 2,531-cell pancreas (2,000 of the original genes) preprocessed as the tutorial does, with scVelo's dynamical
    model: filter_and_normalize(min_shared_counts=20), log1p, neighbours (30 PCs, 30 neighbours, seed 0), moments,
    recover_dynamics(n_jobs=2), velocity(mode='dynamical'), velocity graph. Slow (recover_dynamics: ~3 min on 2 idle
    cores, 15 under load), so it is built once and cached as `.cache/pancreas_2531_dynamical_v<N>.h5ad` (atomic write,
    inter-process lock; FATEBOOK_REBUILD_CACHE=1 or `force` rebuilds). Returns the path."""
    import fcntl, json, os, tempfile, time, warnings
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    out = Path(path) if path is not None else repo / ".cache" / f"pancreas_2531_dynamical_v{DYNAMICAL_VERSION}.h5ad"
    out.parent.mkdir(parents=True, exist_ok=True)
    force = force or os.environ.get("FATEBOOK_REBUILD_CACHE") == "1"
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists() and not force: return out
        import scanpy as sc, scvelo as scv
        from fatebook.datasets import pancreas
        from fatebook.core import scvelo_quiet
        t0 = time.perf_counter()
        with scvelo_quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scv.settings.verbosity = 0
            a = pancreas()
            scv.pp.filter_and_normalize(a, min_shared_counts=20)
            sc.pp.log1p(a)
            sc.pp.neighbors(a, n_pcs=30, n_neighbors=30, random_state=0)
            scv.pp.moments(a, n_pcs=30, n_neighbors=30)
            scv.tl.recover_dynamics(a, n_jobs=2, show_progress_bar=False)
            scv.tl.velocity(a, mode="dynamical")
            scv.tl.velocity_graph(a, n_jobs=1, show_progress_bar=False)
        fd, tmp = tempfile.mkstemp(suffix=".h5ad", dir=out.parent); os.close(fd)
        a.write_h5ad(tmp); os.chmod(tmp, 0o644); os.replace(tmp, out)
        out.with_suffix(".json").write_text(json.dumps(dict(recipe="tutorial, dynamical", n_obs=a.n_obs, n_vars=a.n_vars,
                                                            seconds=round(time.perf_counter() - t0, 1),
                                                            scvelo=scv.__version__), indent=1))
        return out
