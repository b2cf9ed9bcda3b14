#!/usr/bin/env bash
# Creates .venv (or $FORA_VENV) with torch, diffusers, the test tools and fora_fx (editable).
# Sourced by tests/run.sh and examples/run.sh; safe to run again (installs only what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FORA_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    # An unpinned torch pulls a multi-GB CUDA build; 2.13.0 CPU is the project's pin.
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q "setuptools>=68" wheel
"$PY" -m pip install -q -e "$ROOT[test]"
export PY
