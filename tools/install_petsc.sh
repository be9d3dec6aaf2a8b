#!/usr/bin/env bash
# Install the optional `petsc` extra (petsc, petsc4py, slepc, slepc4py) into a Python environment.
# PyPI ships these as sources only. What works on a fresh Debian machine with 2 cores (~10 minutes; pip caches
# the built wheels per Python version, so a second install takes seconds):
#   1. a system BLAS/LAPACK (PETSc cannot download one offline): Debian's libopenblas-dev;
#   2. no X11, no CUDA;
#   3. four separate pip calls in dependency order (one combined call rebuilt some packages twice).
# Usage: tools/install_petsc.sh [PYTHON]   (default: .venv/bin/python)
set -euo pipefail
PY=${1:-.venv/bin/python}
PETSC_VERSION=${PETSC_VERSION:-3.25.6}
SLEPC_VERSION=${SLEPC_VERSION:-3.25.2}
if "$PY" -c "import petsc4py, slepc4py; petsc4py.init(); slepc4py.init()" 2>/dev/null; then
  echo "petsc4py/slepc4py already importable in $PY"; exit 0
fi
if ! ldconfig -p 2>/dev/null | grep -q libopenblas; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas-dev >/dev/null
  else
    echo "PETSc needs BLAS/LAPACK: install libopenblas-dev (Debian/Ubuntu) or use conda's petsc4py/slepc4py" >&2; exit 1
  fi
fi
export PETSC_CONFIGURE_OPTIONS="${PETSC_CONFIGURE_OPTIONS:---with-x=0 --with-cuda=0 --with-debugging=0}"
export MAKEFLAGS="-j$(nproc)"
"$PY" -m pip install -q "petsc==$PETSC_VERSION"
"$PY" -m pip install -q "petsc4py==$PETSC_VERSION"
"$PY" -m pip install -q "slepc==$SLEPC_VERSION"
"$PY" -m pip install -q "slepc4py==$SLEPC_VERSION"
"$PY" -c "import petsc4py, slepc4py; petsc4py.init(); slepc4py.init(); from petsc4py import PETSc; print('PETSc', PETSc.Sys.getVersion(), 'ready')"
