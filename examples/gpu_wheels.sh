#!/usr/bin/env bash
# Fetches, on the dev machine, the wheels examples/gpu_check.sh needs on the GPU machine
# (torch 2.11 / Python 3.12 there, no network, no diffusers). ~7 MB into .whl/ (git-ignored
# locally), then: run(command="bash examples/gpu_check.sh", carry=[".whl"], timeout_s=560).
# The GPU image already has everything else diffusers and cache-dit import (huggingface-hub
# 1.33, safetensors 0.8, regex, requests, Pillow, filelock, zipp, transformers, pyyaml).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# importlib_metadata 8.7: later releases need lazy-importer, which the image lacks.
for pkg in diffusers==0.42.1 cache-dit==1.5.3 importlib_metadata==8.7.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pkg"
done
ls -la .whl
