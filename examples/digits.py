"""The main job: digits drawn by a DiT this project trained, with and without FORA, on CPU.

The model is the class-conditional DiT that ships with fora_fx (diffusers'
DiTTransformer2DModel, 1.77 M parameters, trained on scikit-learn's 8x8 digits; see
docs/quality.md). Every variant samples the same labels from the same noise with 50-step DDIM
and classifier-free guidance:

  baseline   torch.compile(model, fullgraph=True, dynamic=False)      (Inductor, no FORA)
  fora N     fora_fx.transform(model, interval=N)  recomputes attention / MLP outputs on steps
             0, N, 2N, ... and the last step, and reuses the cached ones in between

It prints the sampling speedup over the baseline, FID / IS / precision / recall / class
accuracy in a digits classifier's feature space, PSNR against the baseline's samples, and
writes a grid of samples (one column per class; rows: baseline, then each N). It also checks
that interval 1 reproduces the baseline and exits 1 if it does not.

    python examples/digits.py [--samples 500] [--steps 50] [--intervals 3,6] [--out DIR]

A few hundred samples give a noisy FID; `fora-fx eval` runs the full comparison (2,000
samples x 3 seeds, DPM-Solver too, the peers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fora_fx
from fora_fx.quality.evaluate import Judge, sample, write_grid
from fora_fx.quality.model import load_trained

CFG = 2.0


def timed(model, labels: torch.Tensor, steps: int, batch: int) -> tuple[torch.Tensor, float]:
    """Samples after one untimed warm-up batch (compiles); returns images and the median
    wall-clock seconds per batch."""
    with torch.no_grad():
        sample(model, labels[:batch], -1, "ddim", steps, CFG, batch)
        times: list[float] = []
        imgs = sample(model, labels, 0, "ddim", steps, CFG, batch, times=times)
    return imgs, statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=500, help="digits per variant (50 per class)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--intervals", default="3,6", help="FORA intervals, comma-separated")
    p.add_argument("--batch", type=int, default=100, help="digits per model call (CFG doubles)")
    p.add_argument("--out", default="digits_demo", help="folder for samples.png")
    p.add_argument("--quick", action="store_true", help="100 digits, 10 steps")
    args = p.parse_args()
    samples, steps = (100, 10) if args.quick else (args.samples, args.steps)
    batch = min(args.batch, samples)
    intervals = [int(v) for v in args.intervals.split(",")]
    if samples % batch or any(n < 1 for n in intervals):
        p.error("--samples must be a multiple of --batch, intervals positive integers")

    model = load_trained()
    judge = Judge.build()
    labels = torch.arange(samples) % 10  # column c of the grid is class c
    print(f"digits DiT (1.77 M params, trained in this repo); {samples} samples, {steps} DDIM "
          f"steps, CFG {CFG}, batch {batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    baseline = torch.compile(model, fullgraph=True, dynamic=False)
    ref, ref_time = timed(baseline, labels, steps, batch)
    rows = [("baseline", ref, ref_time, 0.0)]
    for n in [1, *intervals]:
        fast = fora_fx.transform(model, interval=n, num_steps=steps, compiler="inductor")
        imgs, t = timed(fast, labels, steps, batch)
        if n == 1:  # never reuses: must be the baseline
            diff = (imgs - ref).abs().max().item()
            if not diff < 1e-4:
                print(f"FAIL: interval=1 differs from the baseline by {diff:.3e} (>= 1e-4)")
                return 1
            print(f"interval=1 reproduces the baseline (max abs diff {diff:.1e}); "
                  f"its speedup: {ref_time / t:.2f}x")
            continue
        stats = fast._fora_runtime.stats
        rows.append((f"fora N={n}", imgs, t, stats.reuses / stats.calls))

    print(f"\nheld-out real digits: FID {judge.floor:.2f} (the floor)\n")
    print(f"{'variant':<12}{'speedup':>8}{'reused':>8}{'FID':>7}{'IS':>6}{'prec':>6}{'rec':>6}"
          f"{'acc':>7}{'PSNR dB':>9}")
    for name, imgs, t, reused in rows:
        s = judge.score(imgs, labels, None if name == "baseline" else ref)
        psnr = f"{s['psnr']:>9.1f}" if "psnr" in s else f"{'-':>9}"
        print(f"{name:<12}{ref_time / t:>7.2f}x{reused:>8.0%}{s['fid']:>7.2f}{s['is_']:>6.2f}"
              f"{s['precision']:>6.2f}{s['recall']:>6.2f}{s['class_acc']:>7.3f}{psnr}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_grid({name: imgs[:20] for name, imgs, _, _ in rows}, out / "samples.png")
    print(f"\nwrote {out / 'samples.png'} (rows: {', '.join(r[0] for r in rows)}; "
          "same noise, column c is class c)")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.0f} s")
    sys.exit(code)
