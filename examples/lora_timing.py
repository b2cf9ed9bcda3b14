"""Times a small Flux (2 double + 4 single blocks, hidden 128, 256 image and 16 text tokens,
B=2) with and without a rank-16 LoRA on every Linear of its blocks, under torch.compile and
under fora_fx at N=3: ten steps of a 10-step schedule (steps 0, 3, 6, 9 recompute), a warm-up
loop each, then 5 rounds of one loop per variant, interleaved (probe_common.time_variants):
the median speedup of per-round ratios and their range, and whether the run's timing holds.
Prints the sites fora_fx caches with the LoRA.
Run: python examples/lora_timing.py (docs/benchmarks.md has the figures)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig, inject_adapter_in_model

import fora_fx

sys.path.insert(0, str(Path(__file__).parent))
from probe_common import time_variants  # noqa: E402

STEPS, BATCH, SIDE, TEXT = 10, 2, 16, 16


def build() -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12)).eval()
    ids = torch.zeros(SIDE, SIDE, 3)
    ids[..., 1] = torch.arange(SIDE)[:, None]
    ids[..., 2] = torch.arange(SIDE)[None, :]
    g = torch.Generator().manual_seed(1)
    common = dict(encoder_hidden_states=torch.randn(BATCH, TEXT, 64, generator=g),
                  pooled_projections=torch.randn(BATCH, 32, generator=g),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TEXT, 3))
    steps = [dict(hidden_states=torch.randn(BATCH, SIDE * SIDE, 16, generator=g),
                  timestep=torch.full((BATCH,), 1.0 - k / STEPS), **common)
             for k in range(STEPS)]
    return model, steps


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n]
    torch.manual_seed(2)
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=targets,
                                       init_lora_weights=False), model)
    return model.eval()


def main() -> None:
    plain, steps = build()
    for label, model in (("no LoRA", plain), ("LoRA r=16 on every block Linear", with_lora(plain))):
        torch._dynamo.reset()  # the previous label's graphs
        fast = fora_fx.transform(copy.deepcopy(model), interval=3)
        _, t = time_variants({"compile": torch.compile(copy.deepcopy(model), fullgraph=True),
                              "fora": fast}, steps)
        explanation = fora_fx.explain(fast)
        print(f"{label}: torch.compile {1e3 * t.seconds('compile'):.1f} ms, fora_fx N=3 "
              f"{1e3 * t.seconds('fora'):.1f} ms ({t.describe('fora')}); "
              f"{len(explanation.sites)} sites, {explanation.pruned} Linear(s) narrowed; not "
              f"cached: {explanation.uncached or 'nothing'}\n  {t.verdict()}")


if __name__ == "__main__":
    main()
