"""Times HiDream-I1 (the image probe's tiny MoE config) three ways on this machine: under
torch.compile, cached piecewise, and cached piecewise with its MoE feed-forwards in
`hook_sites`. Ten steps of a 10-step schedule at N=3, median of 5 loops after a warm-up loop.
Run: python examples/hook_sites_timing.py (docs/images.md has the figures)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

import fora_fx

sys.path.insert(0, str(Path(__file__).parent))
import image_probe  # noqa: E402
from probe_common import finish, time_loops  # noqa: E402


def main() -> None:
    model, kw = image_probe.CASES["hidream"]()
    model = finish(model).eval()
    steps = [kw(999.0 - 50 * k, 1) for k in range(10)]
    variants = {
        "torch.compile": lambda m: torch.compile(m),
        "fora_fx piecewise": lambda m: fora_fx.transform(m, interval=3, fullgraph=False),
        "fora_fx piecewise + hook_sites": lambda m: fora_fx.transform(
            m, interval=3, fullgraph=False, hook_sites=("*.ff_i",)),
    }
    for name, make in variants.items():
        torch._dynamo.reset()
        warmup, loops = time_loops(make(copy.deepcopy(model)), steps)
        print(f"{name:<32} warm-up {warmup:.1f} s   loop {1e3 * loops[2]:.1f} ms "
              f"(of {[round(1e3 * t, 1) for t in loops]})")


if __name__ == "__main__":
    main()
