#!/usr/bin/env bash
# The test command: bootstrap, lint, type-check, then the whole suite (CPU: 9.7 min measured
# on the quiet 2-core dev machine, 580 s wall with 435 passed, the venv built and Inductor's
# on-disk cache warm from an earlier run; from a clean clone with an empty Inductor cache,
# install included: 1,206 s, pytest 1,058 s of it, ~half of the extra in the bench tests'
# C++ compiles; README says so).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/bootstrap.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$VENV/bin/mypy" fora_fx/
# Two workers (pytest-xdist), one per core: much of a test's time is Dynamo tracing and
# Inductor compiling, single-threaded Python. Tests are dealt one by one (--dist loadgroup),
# but a file whose tests share state (a module fixture, the fuzzer's feature counts) is an
# xdist_group and stays on one worker. Idle OpenMP threads sleep instead of spinning on the
# core the other worker needs.
export OMP_WAIT_POLICY=PASSIVE
"$PY" -m pytest -p no:cacheprovider -n "${FORA_TEST_WORKERS:-2}" --dist loadgroup "$@"
