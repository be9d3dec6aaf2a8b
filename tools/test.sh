#!/usr/bin/env bash
# The README's test command: set up everything on a fresh machine, then run every check and every test.
#   1. .venv with fatebook and all extras (PETSc/SLEPc built from source the first time, cached afterwards)
#   2. .venv-cellrank: CellRank 2.3.3 on Python 3.12, the test-only reference for the parity tests
#   3. nbdev-clean and nbdev-export must leave no diff (notebooks clean, library in sync with the notebooks);
#      import cells hold only imports; stored outputs are clean (tools/check_outputs.py)
#   4. nbdev-test runs every notebook, slow and PETSc cells included
#   5. pytest runs tests/ (last, so the run ends on pytest's summary line); tests/test_docs.py builds the
#      documentation site (bash tools/docs.sh) and checks it in headless Chromium
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=agg PYTHONHASHSEED=0
if [ -z "${FATEBOOK_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export FATEBOOK_DATA_DIR="$(cd ../shared/data && pwd)"; fi
step() { printf '\n=== %s ===\n' "$*"; }

step "environment (.venv)"
bash tools/setup.sh
step "CellRank 2.3.3 reference environment (.venv-cellrank)"
if [ -f tools/cellrank_env.sh ]; then bash tools/cellrank_env.sh || echo "WARNING: CellRank env could not be built; parity tests will say why they skip"; fi

step "nbdev-clean leaves no diff"
before=$(git status --porcelain -- nbs fatebook; git diff -- nbs fatebook | md5sum)
.venv/bin/nbdev-clean
after=$(git status --porcelain -- nbs fatebook; git diff -- nbs fatebook | md5sum)
if [ "$before" != "$after" ]; then git status --short -- nbs; echo "FAIL: notebooks were not clean: run nbdev-clean and commit"; exit 1; fi
step "nbdev-export leaves no diff"
.venv/bin/nbdev-export
after2=$(git status --porcelain -- nbs fatebook; git diff -- nbs fatebook | md5sum)
if [ "$after" != "$after2" ]; then git status --short -- fatebook; echo "FAIL: library and notebooks are not in sync: run nbdev-export and commit"; exit 1; fi

step "no notebook cell mixes imports with other code (nbdev's docs processing runs such cells alone)"
.venv/bin/python tools/check_import_cells.py

step "shipped report template = nbs/templates (tools/sync_templates.py)"
.venv/bin/python tools/sync_templates.py --check

step "stored notebook outputs are clean (no tracebacks, Python warnings, progress bars, machine paths, huge images)"
.venv/bin/python tools/check_outputs.py

step "README.md generated from nbs/index.ipynb"
.venv/bin/python tools/make_readme.py --check

step "nbdev-test (all notebooks, flags: slow petsc)"
.venv/bin/nbdev-test --n-workers 2 --flags "slow petsc" --timing
step "pytest"
.venv/bin/python -m pytest tests -q -p no:cacheprovider
