#!/usr/bin/env bash
# The GPU check for issue 5, as one prepared command for the device tool (H100, torch 2.11
# preinstalled, no diffusers, no network). Prepare the wheels here first (docs/benchmarks.md):
#   run(command="bash examples/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Writes $OUT/*.json and $OUT/bench.md. Cudagraph skips are errors (TORCHINDUCTOR_CUDAGRAPH_OR_ERROR).
set -uo pipefail
OUT="${OUT:-/tmp/fora_out}"; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
else
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
export TORCHINDUCTOR_CUDAGRAPH_OR_ERROR=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
# Correctness first, on the GPU: FORA equals the eager reference at bf16 (CPU tests cover fp32).
python3 -m fora_fx.cli bench --model tiny --steps 10 --repeats 1 --intervals 3 \
  --json "$OUT/tiny.json" | tee "$OUT/bench.md"
for b in 2 16; do
  python3 -m fora_fx.cli bench --model dit-xl-2 --batch "$b" --steps 50 --repeats 3 \
    --intervals 2,3,4,6 --json "$OUT/dit_b$b.json" | tee -a "$OUT/bench.md"
done
python3 -m fora_fx.cli bench --model pixart-512 --batch 2 --steps 50 --repeats 3 \
  --intervals 3,6 --json "$OUT/pixart_b2.json" | tee -a "$OUT/bench.md"
