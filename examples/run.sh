#!/usr/bin/env bash
# The main job: bootstrap, then the CPU demo (small DiT with and without FORA). Extra
# arguments go to examples/demo.py (e.g. --quick, --interval 4).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/bootstrap.sh"
cd "$ROOT"
"$PY" examples/demo.py "$@"
