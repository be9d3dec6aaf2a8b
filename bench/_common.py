"""Shared helpers of the benchmark scripts (standard library + numpy only: imported in both environments)."""
from __future__ import annotations
import json, os, platform, resource, subprocess, sys, time
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
FATEBOOK_PY = REPO / ".venv" / "bin" / "python"
CELLRANK_PY = Path(os.environ.get("CELLRANK_VENV", REPO / ".venv-cellrank")) / "bin" / "python"


class Stages:
    """Wall-clock and CPU time per stage (time.perf_counter, time.process_time), the part of that CPU time spent in the
    kernel (getrusage ru_stime: mostly page faults of fresh memory) and the process's peak resident memory; with
    `memory=True` also the peak RSS *during* each stage, from a thread that samples /proc/self/statm every 5 ms."""
    def __init__(self, memory: bool = False):
        self.t, self.cpu, self.sys, self.peak, self.t0 = {}, {}, {}, {}, time.perf_counter()
        self._sampler = _RssSampler() if memory else None

    @contextmanager
    def __call__(self, name):
        t, c, k = time.perf_counter(), time.process_time(), _stime()
        if self._sampler: self._sampler.reset()
        try: yield
        finally:
            self.t[name] = time.perf_counter() - t
            self.cpu[name] = time.process_time() - c
            self.sys[name] = _stime() - k
            if self._sampler: self.peak[name] = self._sampler.peak_mb()

    def result(self, **extra) -> dict:
        out = dict(seconds=self.t, cpu_seconds=self.cpu, sys_cpu_seconds=self.sys, total_process_seconds=time.perf_counter() - self.t0,
                   peak_rss_mb=peak_rss_mb(), python=platform.python_version(), **extra)
        if self._sampler: out["stage_peak_rss_mb"] = self.peak
        return out


def _stime() -> float:
    "CPU seconds this process spent in the kernel so far (page faults, system calls)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


class _RssSampler:
    "Peak resident memory since the last reset, sampled every 5 ms by a daemon thread (Linux /proc/self/statm)."
    def __init__(self, every=0.005):
        import threading
        self._page = os.sysconf("SC_PAGE_SIZE"); self._max = 0; self._every = every
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()
    def _rss(self):
        with open("/proc/self/statm") as f: return int(f.read().split()[1]) * self._page
    def _run(self):
        while True:
            r = self._rss()
            with self._lock: self._max = max(self._max, r)
            time.sleep(self._every)
    def reset(self):
        with self._lock: self._max = self._rss()
    def peak_mb(self) -> float:
        with self._lock: return max(self._max, self._rss()) / 2**20


def peak_rss_mb() -> float:
    "Peak resident set size of this process (resource.getrusage ru_maxrss, KiB on Linux) in MiB."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(res: dict):
    "Print the result of a worker process as the last stdout line (parsed by the driver)."
    print("BENCH-RESULT " + json.dumps(res), flush=True)


def run_worker(python, script, *args, timeout=3600, env=None) -> dict:
    "Run a worker script in a fresh process and return its BENCH-RESULT (or an 'error' entry)."
    e = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    for k in ("PYTHONPATH", "VIRTUAL_ENV"): e.pop(k, None)
    t = time.perf_counter()
    try:
        r = subprocess.run([str(python), str(BENCH / script), *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env=e, cwd=REPO)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout} s")
    wall = time.perf_counter() - t
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            res = json.loads(line[len("BENCH-RESULT "):]); res["wall_seconds"] = wall; return res
    tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
    return dict(error=f"{script} exit {r.returncode}:\n{tail}")


def add_threads_arg(ap):
    "The drivers' `--threads` option (see `thread_env`)."
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS/OpenMP/numba threads of every worker, and fatebook's own (default: the libraries' own "
                         "choice). On a shared, loaded machine use 1: OpenBLAS threads spin-wait and a busy core slows "
                         "dense LAPACK ~10x.")


def thread_env(n) -> dict:
    "Environment pinning BLAS/OpenMP/numba threads to n (empty dict for None: the libraries decide)."
    if not n: return {}
    return {k: str(n) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                                 "VECLIB_MAXIMUM_THREADS")}


def has_petsc(python) -> bool:
    r = subprocess.run([str(python), "-c", "import petsc4py, slepc4py; petsc4py.init(); slepc4py.init()"],
                       capture_output=True)
    return r.returncode == 0


def machine() -> dict:
    load = os.getloadavg()
    return dict(host=platform.node(), cpus=os.cpu_count(), loadavg=[round(x, 2) for x in load],
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def fmt_s(x):
    if x is None: return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}"


def table(rows, headers) -> str:
    rows = [[str(c) for c in r] for r in rows]
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
    return "\n".join([line(headers), line(["-" * x for x in w]), *map(line, rows)])


def save(name: str, payload: dict, text: str):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"{name}_{stamp}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}_latest.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{name}_latest.txt").write_text(text + "\n")
    return RESULTS / f"{name}_{stamp}.json"


def pancreas_pp_path() -> Path:
    "The cached preprocessed pancreas shared with the tests (built on first use by tests/conftest.py)."
    sys.path.insert(0, str(REPO / "tests"))
    import conftest  # noqa: the fixtures module doubles as the cache builder
    return conftest.build_pancreas_pp()
