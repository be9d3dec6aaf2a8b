#!/usr/bin/env bash
# Build `.venv-cellrank`: CellRank 2.3.3 in its own Python 3.12 environment, the test-only reference that
# tests/test_parity_*.py and bench/ run through a subprocess. CellRank is never a dependency of fatebook.
#
# Usage: bash tools/cellrank_env.sh [--petsc] [--check]
#   --petsc  also install PETSc/SLEPc 3.25 (tools/install_petsc.sh; ~10 min on 2 cores the first time).
#            CellRank 2.3.3 calls Mat.getVecs, which petsc4py 3.26 removed: keep 3.25.
#   --check  only report whether the environment is usable (exit 0/1), never install.
# Environment: CELLRANK_PYTHON (a python3.12 executable), CELLRANK_VENV (default: .venv-cellrank in the repo).
# Idempotent: a second run only checks the stamp and imports (~4 s).
#
# Pins: CellRank 2.3.3 itself pins nothing above; this is the set verified on 2026-11-24 (it imports, and the
# kernels, Schur (brandts/krylov), GPCCA, fates and drivers run on the dentate-gyrus and pancreas data). The pins
# keep the reference reproducible: a future numpy/pandas/numba release must not change the reference under us.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CELLRANK_VENV:-.venv-cellrank}
PETSC=0; CHECK=0
for a in "$@"; do
  case "$a" in
    --petsc) PETSC=1 ;;
    --check) CHECK=1 ;;
    *) echo "unknown option '$a' (use --petsc and/or --check)" >&2; exit 2 ;;
  esac
done

PINS=(
  "cellrank==2.3.3"
  "numpy==2.5.5" "scipy==1.16.3" "pandas==3.1.1"
  "numba==0.68.1" "llvmlite==0.50.0"
  "anndata==0.13.4" "scanpy==1.12.4" "h5py==3.16.0"
  "pygpcca==1.0.4" "scikit-learn==1.9.1" "matplotlib==3.11.2" "pygam==0.12.0" "statsmodels==0.15.0"
)
SMOKE='import warnings; warnings.simplefilter("ignore")
import cellrank, numpy, scipy, pandas, anndata
assert cellrank.__version__ == "2.3.3", cellrank.__version__
print("cellrank", cellrank.__version__, "numpy", numpy.__version__, "scipy", scipy.__version__, "pandas", pandas.__version__, "anndata", anndata.__version__)'

find_python() {
  if [ -n "${CELLRANK_PYTHON:-}" ]; then echo "$CELLRANK_PYTHON"; return; fi
  if python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    command -v python3.12; return
  fi
  local root cand
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  for cand in $(ls -d "$root"/versions/3.12.*/bin/python3.12 2>/dev/null | sort -V -r) /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if [ -x "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$cand"; return
    fi
  done
  return 1
}

stamp="$VENV/.cellrank-pins"
want=$(printf '%s\n' "${PINS[@]}")
if [ "$CHECK" = 1 ]; then
  [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$VENV/bin/python" -c "$SMOKE" && exit 0
  echo "$VENV is not built (run: bash tools/cellrank_env.sh)" >&2; exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { echo "CellRank 2.3.3 needs Python 3.12: none found (tried python3.12, \$(pyenv root)/versions/3.12.*; set CELLRANK_PYTHON=/path/to/python3.12)" >&2; exit 1; }
  echo "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing ${PINS[*]} into $VENV"
  if ! out=$("$VENV/bin/python" -m pip install -q "${PINS[@]}" 2>&1); then
    echo "$out" | grep -v 'is ignored' >&2
    echo "pip could not install the CellRank reference into $VENV (needs PyPI access)" >&2; exit 1
  fi
  "$VENV/bin/python" -c "$SMOKE"
  echo "$want" > "$stamp"
fi
if [ "$PETSC" = 1 ]; then
  # 3.25.x on purpose (see the header); install_petsc.sh returns at once when already importable.
  PETSC_VERSION=${PETSC_VERSION:-3.25.6} SLEPC_VERSION=${SLEPC_VERSION:-3.25.2} \
    bash tools/install_petsc.sh "$VENV/bin/python"
  "$VENV/bin/python" -c "from petsc4py import PETSc; assert hasattr(PETSc.Mat, 'getVecs'), 'petsc4py without Mat.getVecs: CellRank 2.3.3 needs 3.25'"
fi
"$VENV/bin/python" -c "$SMOKE"
