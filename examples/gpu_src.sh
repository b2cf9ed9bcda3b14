#!/usr/bin/env bash
# Lays fora_fx out under DEST as an install would (pyproject.toml's package-dir maps passes/
# to fora_fx.passes), from this checkout, without building or installing anything: the GPU
# image has no network and fora_fx is not installed there. A checkout on PYTHONPATH does not
# import (`fora_fx.passes` is not a folder of fora_fx/); DEST does. Usage: gpu_src.sh DEST
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$1"
rm -rf "$DEST/fora_fx" && mkdir -p "$DEST"
cp -r "$ROOT/fora_fx" "$DEST/fora_fx"
cp -r "$ROOT/passes" "$DEST/fora_fx/passes"
find "$DEST/fora_fx" -name __pycache__ -prune -exec rm -rf {} +
