#!/usr/bin/env bash
# The GPU check for issue 5, as one prepared command for the device tool (H100, torch 2.11
# preinstalled, no diffusers, no network). Prepare the wheels here first (docs/benchmarks.md):
#   run(command="bash examples/gpu_check.sh", carry=[".whl"], timeout_s=560)
# Writes $OUT/*.json (rewritten after every row, so a run cut off keeps what it measured) and
# $OUT/bench.md. Cudagraph skips are errors (TORCHINDUCTOR_CUDAGRAPH_OR_ERROR). Ordered by
# what matters most, each part under its own time limit. B counts CFG: --batch 1 is B=2.
source "$(dirname "$0")/gpu_setup.sh"
# Correctness first, on the GPU: bf16, CUDA graphs, FORA equal to the eager FORA.
bench 50 tiny --model tiny --steps 10 --repeats 1 --intervals 3 --no-compiled-peers
# DiT-XL/2: B=2 with every row, then B=16; PixArt-alpha 512 (cross-attention) at B=2.
# Every family of rows compiles cold (fora_fx/bench/timing.py), so the B=16 and PixArt runs
# keep to eager, compiled and fora_fx: the peers and the ablation are compared at B=2.
# The B=2 run also has the forecast rows (forecast="taylor", order 2, docs/forecast.md): their
# reuse step against FORA's is the cost of forecasting inside the graph under CUDA graphs.
bench 230 dit_b2 --model dit-xl-2 --batch 1 --steps 50 --repeats 3 --intervals 3,6 --profile
bench 170 dit_b16 --model dit-xl-2 --batch 8 --steps 50 --repeats 3 --intervals 3,6 --profile \
  --no-peers --no-ablation --no-forecast
bench 120 pixart_b2 --model pixart-512 --batch 1 --steps 50 --repeats 3 --intervals 3,6 \
  --no-peers --no-ablation --no-forecast
# Context parallelism (docs/parallel.md): small-wan sharded over every GPU with Ulysses, compiled
# uncached against FORA N=3 (the CP bench writes no JSON: its table goes to bench.md). One GPU
# cannot shard: skipped, said in bench.md.
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$ngpu" -ge 2 ]; then
  timeout 150 torchrun --nproc-per-node "$ngpu" -m fora_fx.cli bench --model small-wan \
    --context-parallel "$ngpu" --steps 20 --repeats 3 --intervals 3 \
    2> >(tee "$OUT/cp.log" >&2) | tee -a "$OUT/bench.md"
else
  echo "context-parallel bench skipped: needs >= 2 GPUs, this machine has $ngpu" | tee -a "$OUT/bench.md"
fi
