"""The main job: digits drawn by a DiT this project trained, with and without FORA, on CPU.

The model is the class-conditional DiT that ships with fora_fx (diffusers'
DiTTransformer2DModel, 1.77 M parameters, trained on scikit-learn's 8x8 digits; see
docs/quality.md). Every variant samples the same labels from the same noise with DDIM and
classifier-free guidance:

  baseline   torch.compile(model, fullgraph=True, dynamic=False)      (Inductor, no FORA)
  fora N     fora_fx.transform(model, interval=N)  recomputes attention / MLP outputs on steps
             0, N, 2N, ... and the last step, and reuses the cached ones in between

Sampling is the timing: batch r of every variant runs in round r, the variants in rotating
order (fora_fx.bench.timing.interleave), and a speedup is the median over rounds of the
baseline's time / the variant's time in the same round, with its range. interval=1 never
reuses, so its speedup must be ~1x: if it is not, within the noise the rounds measured, the
run is flagged UNRELIABLE (a busy machine, not FORA). interval=1 must also reproduce the
baseline's samples, else the job exits 1.

Quality, in the features of a digits classifier trained on the training split: FID against
the training digits (the floor is the FID of as many held-out real digits: a few hundred
samples bias FID upwards, so compare rows with each other and with that floor), Inception
Score, k-NN precision / recall, class accuracy, and PSNR against the baseline's samples. It
writes samples.png (one column per class; rows: baseline, then each N), fid_vs_speedup.png
and results.json (rows and timing, the reliability flag included) into --out.

    python examples/digits.py [--samples 200] [--steps 16] [--batch 40] [--intervals 3,6]

Sized to finish in about 3 minutes on a 2-core CPU, compiles included, while another process
shares the cores (README has the measured times). Fewer than ~200 samples would make FID
mostly sampling bias (the held-out floor rises to the models' values), so the steps were cut
instead. `fora-fx eval` is the full study (2,000 samples x 3 seeds, 50-step DDIM and
DPM-Solver, the peers).
"""

from __future__ import annotations

import os

# Before torch loads libgomp: its default spin-waiting makes two threads wait out each
# other's time slices when another process shares the 2 cores (fora_fx/quality/train.py's
# note); PASSIVE changes scheduling, never results.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import fora_fx  # noqa: E402
from fora_fx.bench.progress import bar  # noqa: E402
from fora_fx.bench.timing import Timings, interleave  # noqa: E402
from fora_fx.quality.data import load_digits_split  # noqa: E402
from fora_fx.quality.evaluate import Judge, sample, write_grid  # noqa: E402
from fora_fx.quality.metrics import fid  # noqa: E402
from fora_fx.quality.model import NULL_CLASS, load_trained  # noqa: E402

CFG = 2.0


@torch.no_grad()
def warm(model, batch: int) -> None:
    """Compiles what sampling runs, untimed: a refresh and a reuse call with the sampler's
    shapes and strides (a timestep expanded from a scalar, as `sample` passes it)."""
    x = torch.zeros(2 * batch, 1, 8, 8)
    y = torch.full((2 * batch,), NULL_CLASS)
    for t in (999, 949):
        model(x, timestep=torch.tensor(t).expand(2 * batch), class_labels=y)
    if isinstance(model, fora_fx.ForaModule):
        fora_fx.reset(model)  # the next call starts a generation at step 0


def plot(rows: list[dict], timing: Timings, floor: float, path: Path) -> None:
    """FID against speedup, one point per printed row, the speedup's per-round range as
    horizontal bars: the trade-off at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for i, r in enumerate(rows):
        s, name = r["speedup"], r["variant"]
        lo, hi = (1.0, 1.0) if name == "baseline" else (s["lo"], s["hi"])
        ax.errorbar([s["median"]], [r["fid"]], xerr=[[s["median"] - lo], [hi - s["median"]]],
                    marker="os^dv"[i % 5], color=f"C{i}", capsize=3, label=name)
    ax.axhline(floor, color="grey", linestyle=":", label="held-out real digits")
    ax.set_xlabel("speedup over the compiled baseline (median, per-round range)")
    ax.set_ylabel("FID (digits-classifier features), lower is better")
    title = f"{rows[0]['samples']} samples, {rows[0]['steps']} DDIM steps"
    ax.set_title(title + ("  [timing UNRELIABLE]" if timing.unreliable else ""), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=200, help="digits per variant (20 per class)")
    p.add_argument("--steps", type=int, default=16, help="DDIM steps")
    p.add_argument("--intervals", default="3,6", help="FORA intervals, comma-separated")
    p.add_argument("--batch", type=int, default=40,
                   help="digits per model call (CFG doubles); samples / batch = timing rounds")
    p.add_argument("--out", default="digits_demo", help="folder for the pictures and JSON")
    p.add_argument("--quick", action="store_true", help="100 digits, 10 steps, batch 20")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args()
    samples, steps, batch = (100, 10, 20) if args.quick else (args.samples, args.steps,
                                                               args.batch)
    batch = min(batch, samples)
    intervals = [int(v) for v in args.intervals.split(",")]
    if samples % batch or any(n < 1 for n in intervals):
        p.error("--samples must be a multiple of --batch, intervals positive integers")
    rounds = samples // batch

    model = load_trained()
    judge = Judge.build()
    labels = torch.arange(samples) % 10  # column c of the grid is class c
    print(f"digits DiT (1.77 M params, trained in this repo); {samples} samples, {steps} DDIM "
          f"steps, CFG {CFG}, batch {batch} ({rounds} timing rounds); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)

    models = {"baseline": torch.compile(model, fullgraph=True, dynamic=False)}
    for n in [1, *intervals]:
        models[f"fora N={n}"] = fora_fx.transform(model, interval=n, num_steps=steps,
                                                   compiler="inductor")
    started = time.perf_counter()
    with bar(len(models), "compiling", args.quiet, unit="model") as b:
        for name, m in models.items():
            b.set_postfix_str(name)
            warm(m, batch)
            b.update()
    compiled = time.perf_counter()

    def runner(m):  # round r samples batch r: same labels and noise for every variant
        return lambda r: sample(m, labels[r * batch:(r + 1) * batch], r, "ddim", steps, CFG,
                                batch)

    with torch.no_grad(), bar(rounds * len(models), "sampling", args.quiet) as b:
        def step(name: str, r: int) -> None:
            b.set_postfix_str(f"round {r + 1}/{rounds}, {name} done")
            b.update()

        timing = interleave({k: runner(m) for k, m in models.items()}, rounds, "baseline",
                            controls=["fora N=1"], keep=True, progress=step)
    print(f"compiling {compiled - started:.0f} s, sampling and timing "
          f"{time.perf_counter() - compiled:.0f} s")
    imgs = {k: torch.cat(v) for k, v in timing.outputs.items()}
    ref = imgs["baseline"]
    diff = (imgs["fora N=1"] - ref).abs().max().item()
    if not diff < 1e-4:
        print(f"FAIL: interval=1 differs from the baseline by {diff:.3e} (>= 1e-4)")
        return 1
    print(f"interval=1 reproduces the baseline (max abs diff {diff:.1e}); its speedup: "
          f"{timing.describe('fora N=1')}")
    print(timing.verdict())

    _, _, test_x, _ = load_digits_split()
    with torch.no_grad():
        floor = fid(judge.train_features, judge.clf.features(test_x[:samples]))
    print(f"\nFID of {min(samples, len(test_x))} held-out real digits: {floor:.2f} (the floor)\n")
    print(f"{'variant':<12}{'speedup':>8}{'reused':>8}{'range':>12}{'FID':>7}{'IS':>6}"
          f"{'prec':>6}{'rec':>6}{'acc':>7}{'PSNR dB':>9}")
    rows = []
    for name, m in models.items():
        if name == "fora N=1":
            continue
        s = judge.score(imgs[name], labels, None if name == "baseline" else ref)
        fora = isinstance(m, fora_fx.ForaModule)  # the last generation's steps, True=refresh
        reused = fora_fx.stats(m).history[-steps:].count(False) / steps if fora else 0.0
        sp = timing.speedups.get(name)
        span = f"{sp.lo:.2f}-{sp.hi:.2f}" if sp else "-"
        psnr = f"{s['psnr']:>9.1f}" if "psnr" in s else f"{'-':>9}"
        print(f"{name:<12}{timing.speedup(name):>7.2f}x{reused:>8.0%}{span:>12}{s['fid']:>7.2f}"
              f"{s['is_']:>6.2f}{s['precision']:>6.2f}{s['recall']:>6.2f}"
              f"{s['class_acc']:>7.3f}{psnr}")
        rows.append({"variant": name, "samples": samples, "steps": steps, "reused": reused,
                     "speedup": vars(sp) if sp else {"median": 1.0}, **s})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_grid({r["variant"]: imgs[r["variant"]][:20] for r in rows}, out / "samples.png")
    plot(rows, timing, floor, out / "fid_vs_speedup.png")
    (out / "results.json").write_text(json.dumps(
        {"setup": {"samples": samples, "steps": steps, "batch": batch, "cfg": CFG,
                   "torch": torch.__version__, "threads": torch.get_num_threads()},
         "fid_floor_heldout": floor, "interval1_max_abs_diff": diff, "rows": rows,
         "timing": timing.to_json()}, indent=2))
    print(f"\nwrote {out / 'samples.png'} (rows: {', '.join(r['variant'] for r in rows)}; "
          f"same noise, column c is class c), {out / 'fid_vs_speedup.png'}, "
          f"{out / 'results.json'}")
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - start:.0f} s")
    sys.exit(code)
