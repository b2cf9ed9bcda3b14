#!/usr/bin/env bash
# The test command: bootstrap, lint, type-check, then the whole suite (CPU: 28 min on the
# 2-core dev machine with the venv built; README says so).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/bootstrap.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy" fora_fx/
"$PY" -m pytest -p no:cacheprovider "$@"
