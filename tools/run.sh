#!/usr/bin/env bash
# The README's main job: the end-to-end fate analysis on the embedded default data (fatebook.datasets.simulate).
# Usage: bash tools/run.sh [OUT_DIR] [extra `fatebook run` options]   (default OUT_DIR: results)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results}; shift || true
bash tools/setup.sh --no-petsc >/dev/null
export MPLBACKEND=agg
.venv/bin/fatebook run --out "$out" "$@"
