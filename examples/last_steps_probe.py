"""Probe: how much of FORA's quality loss comes from reusing features on the final steps?

On the digits DiT with DPM-Solver++-20, FORA N=6 (recomputes 0, 6, 12, 18, 19) scored far
better than N=5 (0, 5, 10, 15, 19) at the same 5 full steps (docs/quality.md). This probe
keeps the last k steps exact on top of the usual rule and compares, on one seed, FID and PSNR
against the uncached samples. ForaConfig has no such option yet; the probe subclasses it,
which works because `ForaConfig.refreshes` is the one place the schedule is decided.

    python examples/last_steps_probe.py [--samples 2000] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from fora_fx import api
from fora_fx.config import ForaConfig
from fora_fx.quality.evaluate import Judge, sample
from fora_fx.quality.model import load_trained

STEPS, CFG, SEED = 20, 2.0, 0


@dataclasses.dataclass(frozen=True)
class LastK(ForaConfig):
    """ForaConfig whose last `last_k` steps of a generation always recompute."""

    last_k: int = 2

    def refreshes(self, step: int, num_steps: int | None = None) -> bool:
        n = self.num_steps if num_steps is None else num_steps
        return super().refreshes(step, num_steps) or (n is not None and step >= n - self.last_k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="20 samples, eager (no Inductor)")
    args = p.parse_args()
    samples, compiler = (20, "eager") if args.quick else (args.samples, "inductor")
    judge, base = Judge.build(), load_trained()
    labels = torch.arange(samples) % 10
    batch = min(100, samples)
    with torch.no_grad():
        ref = sample(base, labels, SEED, "dpm", STEPS, CFG, batch)
    base_fid = judge.score(ref, labels)["fid"]
    print(f"DPM-Solver++-{STEPS}, {samples} samples, seed {SEED}: uncached FID {base_fid:.2f}")
    for name, cfg in [("N=5", ForaConfig(interval=5)), ("N=5 last 2", LastK(interval=5)),
                      ("N=6", ForaConfig(interval=6)), ("N=7 last 2", LastK(interval=7)),
                      ("N=4 last 2", LastK(interval=4))]:
        cfg = cfg.replace(num_steps=STEPS, compiler=compiler)
        full = [k for k in range(STEPS) if cfg.refreshes(k)]
        with torch.no_grad():
            imgs = sample(api.transform(base, cfg), labels, SEED, "dpm", STEPS, CFG, batch)
        s = judge.score(imgs, labels, ref)
        print(f"{name:<11} recomputes {len(full):>2}/{STEPS} {full}: FID {s['fid']:.2f} "
              f"({s['fid'] - base_fid:+.2f}), PSNR {s['psnr']:.1f} dB")


if __name__ == "__main__":
    main()
