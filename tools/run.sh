#!/usr/bin/env bash
# The README's main job: the end-to-end fate analysis on the embedded default data (fatebook.datasets.simulate).
# Usage: bash tools/run.sh [OUT_DIR] [extra `fatebook run` options]   (default OUT_DIR: results)
#        bash tools/run.sh results --adata my.h5ad --terminal-states Alpha,Beta   (your data; see `fatebook run --help`)
# Exit code: 0 ok, 2 bad option or input (one-line message), 3 degenerate result (said prominently), 1 internal error.
# OUT_DIR is written all or nothing, and replaced only if it is a previous fatebook output.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results}; shift || true
bash tools/setup.sh --no-petsc >/dev/null
export MPLBACKEND=agg
exec .venv/bin/fatebook run --out "$out" "$@"
