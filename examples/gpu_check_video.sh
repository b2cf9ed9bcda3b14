#!/usr/bin/env bash
# The video DiT on a GPU: Wan 2.1 T2V 1.3B's config (random weights; 17 frames at 320 x 512,
# 3,200 video tokens, B=2 with CFG batched), bf16, CUDA graphs. Second priority after
# examples/gpu_check.sh (issue 5's targets), for a session whose device time allows it:
#   run(command="bash examples/gpu_check_video.sh", carry=[".whl"], timeout_s=420)
# Same setup as gpu_check.sh (examples/gpu_setup.sh).
source "$(dirname "$0")/gpu_setup.sh"
bench 380 wan_b2 --model wan-1.3b --batch 1 --steps 30 --repeats 3 --intervals 3,6 \
  --no-peers --no-ablation --profile
