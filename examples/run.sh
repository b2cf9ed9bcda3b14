#!/usr/bin/env bash
# The main job: bootstrap, then digits drawn by the DiT this project trained, with and
# without FORA (speedup, quality numbers, sample grid, FID-vs-speedup plot). Extra arguments
# go to examples/digits.py (e.g. --quick, --quiet, --intervals 2,4, --out DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FORA_VENV:-$ROOT/.venv}"
# A venv that already has what the job needs skips the bootstrap: its pip pass re-checks
# every requirement and took over a minute of the job on the busy 2-core machine.
if "$VENV/bin/python" -c "import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ('torch', 'fora_fx', 'diffusers', 'matplotlib',
                                               'sklearn', 'safetensors', 'tqdm')))" 2>/dev/null; then
  PY="$VENV/bin/python"
else
  source "$ROOT/.ci/bootstrap.sh"
fi
cd "$ROOT"
# Threads that spin while waiting make two processes on 2 cores wait out each other's time
# slices; passive waiting changes scheduling only (examples/digits.py sets it too).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"$PY" examples/digits.py "$@"
