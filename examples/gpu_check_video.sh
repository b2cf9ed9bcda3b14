#!/usr/bin/env bash
# The video DiT on a GPU: Wan 2.1 T2V 1.3B's config (random weights; 17 frames at 320 x 512,
# 3,200 video tokens, B=2 with CFG batched), bf16, CUDA graphs. Second priority after
# examples/gpu_check.sh (issue 5's targets), for a session whose device time allows it:
#   run(command="bash examples/gpu_check_video.sh", carry=[".whl"], timeout_s=420)
# Same setup as gpu_check.sh: the wheels from examples/gpu_wheels.sh, cudagraph skips as
# errors, $OUT/*.json rewritten after every row.
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
timeout 380 python3 -m fora_fx.cli bench --model wan-1.3b --batch 1 --steps 30 --repeats 3 \
  --intervals 3,6 --no-peers --no-ablation --profile --json "$OUT/wan_b2.json" \
  2> >(tee "$OUT/wan_b2.log" >&2) | tee -a "$OUT/bench.md"
