#!/usr/bin/env bash
# The main job: bootstrap, then digits drawn by the DiT this project trained, with and
# without FORA (speedup, quality numbers, sample grid). Extra arguments go to
# examples/digits.py (e.g. --quick, --intervals 2,4, --out DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/bootstrap.sh"
cd "$ROOT"
"$PY" examples/digits.py "$@"
