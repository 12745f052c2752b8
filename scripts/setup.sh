#!/usr/bin/env bash
# Set up preftune for development and use.
# - Uses the active virtualenv if there is one, else creates ./.venv (seeing system packages,
#   so a GPU build of torch you already have is used as is).
# - Installs the CPU build of torch only when no torch is importable; never replaces one.
# - Installs preftune in editable mode with its test tools; skips that when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY=python
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv --system-site-packages .venv
  fi
  PY=.venv/bin/python
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found; installing the CPU build (torch==${PREFTUNE_TORCH_VERSION:-2.13.0})"
  "$PY" -m pip install --quiet "torch==${PREFTUNE_TORCH_VERSION:-2.13.0}"
fi

stamp=".venv/.preftune-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.prefix)')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$PY" -c "import preftune" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet -e ".[dev]"
  mkdir -p .venv && echo "$want" > "$stamp"
fi
