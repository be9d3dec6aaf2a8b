#!/usr/bin/env bash
# Create (or update) the project's virtual environment .venv with fatebook and every extra, PETSc included.
# Idempotent: a second run only checks. Usage: bash tools/setup.sh [--no-petsc]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${FATEBOOK_PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.fatebook-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # compat mode: a plain path in the .pth file (the default import hook broke the slepc source build)
  .venv/bin/python -m pip install -q -e ".[dev,widgets,reports]" --config-settings editable_mode=compat
  touch "$stamp"
fi
if [ "${1:-}" != "--no-petsc" ]; then bash tools/install_petsc.sh .venv/bin/python; fi
# Browser tests (widgets in JupyterLab, the documentation site) drive Debian's chromium through chromedriver.
if [ "${1:-}" != "--no-petsc" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "WARNING: browser tests need Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)" >&2
  fi
fi
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (fatebook)" >/dev/null
.venv/bin/python -c "import fatebook; print('fatebook', fatebook.__version__, 'installed in .venv')"
