#!/usr/bin/env bash
# Build the documentation site from the notebooks into _site/ (git-ignored); open _site/index.html or serve the
# folder (python -m http.server -b 127.0.0.1 -d _site). nbdev's processing -> Sphinx + MyST-NB with the stored outputs; see
# tools/docs.py and DEVELOPERS.md ("Documentation site").
# Usage: bash tools/docs.sh [--out DIR] [--build DIR] [--force] [--traceback]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sphinx-build ] || bash tools/setup.sh --no-petsc
if [ -z "${FATEBOOK_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export FATEBOOK_DATA_DIR="$(cd ../shared/data && pwd)"; fi
export MPLBACKEND=agg PYTHONHASHSEED=0
exec .venv/bin/python tools/docs.py "$@"
