"""Times HiDream-I1 (the image probe's tiny MoE config) three ways on this machine: under
torch.compile, cached piecewise, and cached piecewise with its MoE feed-forwards in
`hook_sites`. Ten steps of a 10-step schedule at N=3; a warm-up loop each, then 5 rounds of
one loop per variant, interleaved (probe_common.time_variants): median loop time, the median
speedup of per-round ratios over torch.compile and their range, and whether the timing holds.
Run: python examples/hook_sites_timing.py (docs/images.md has the figures)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

import fora_fx

sys.path.insert(0, str(Path(__file__).parent))
import image_probe  # noqa: E402
from probe_common import finish, time_variants  # noqa: E402


def main() -> None:
    model, kw = image_probe.CASES["hidream"]()
    model = finish(model).eval()
    steps = [kw(999.0 - 50 * k, 1) for k in range(10)]
    variants = {
        "torch.compile": lambda m: torch.compile(m),
        "fora_fx piecewise": lambda m: fora_fx.transform(
            m, interval=3, piecewise=fora_fx.Piecewise()),
        "fora_fx piecewise + hook_sites": lambda m: fora_fx.transform(
            m, interval=3, piecewise=fora_fx.Piecewise(hook_sites=("*.ff_i",))),
    }
    models = {name: make(copy.deepcopy(model)) for name, make in variants.items()}
    first, t = time_variants(models, steps)
    for name in models:
        print(f"{name:<32} warm-up {first[name]:.1f} s   loop {1e3 * t.seconds(name):.1f} ms   "
              f"{t.describe(name)}")
    print(t.verdict())

if __name__ == "__main__":
    main()
