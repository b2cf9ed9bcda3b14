"""`fora-fx eval`: FORA's quality against the uncached model and the peers, same budgets.

On the DiT trained on scikit-learn's digits (fora_fx/quality/model.py), every method samples
the same seeds and labels with 50-step DDIM (and 20-step DPM-Solver++) and batched
classifier-free guidance. Metrics are computed in the features of the digits classifier
(classifier.py) against the training split: FID, Inception Score, k-NN precision / recall,
class accuracy of the conditional samples, and PSNR of each sample against the uncached
sample from the same seed. The held-out split's FID is the floor. Mean and spread over seeds.
"""

from __future__ import annotations

import copy
import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import api, peers_cachedit
from ..capture import capture, module_paths
from ..passes import locate
from ..peers import DiffusersHook, SiteCounter
from .classifier import DigitsClassifier, train_classifier
from .data import load_digits_split
from .metrics import class_accuracy, fid, inception_score, precision_recall, psnr
from .model import NULL_CLASS, load_trained

METHODS = ("fora", "taylorseer", "pab", "cache-dit", "cache-dit+taylorseer")


@dataclass
class EvalSetup:
    samples: int = 2000  # per seed; labels cycle through the 10 classes
    seeds: tuple[int, ...] = (0, 1, 2)
    intervals: tuple[int, ...] = (2, 3, 4, 5, 6, 7)
    samplers: tuple[tuple[str, int], ...] = (("ddim", 50), ("dpm", 20))
    cfg: float = 2.0
    # Images per model call (doubled by CFG). On the 2-core CPU the compiled model's cost per
    # input is flat from 200 to 400 inputs and 20% higher at 2,000 (measured: 0.91 vs 1.10 ms).
    batch: int = 100
    compile: bool = True
    eager_batches: int = 3  # timing-only batches of the uncompiled model (speedup_eager)
    # besides the baseline (always run: PSNR and speedups are relative to it)
    methods: tuple[str, ...] = METHODS
    peer_interval: int = 3  # the peers' refresh interval

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; valid: {','.join(METHODS)}")


@dataclass
class Result:
    sampler: str
    steps: int
    method: str
    interval: int | None
    fid: float
    fid_std: float
    is_: float
    precision: float
    recall: float
    class_acc: float
    psnr: float | None  # dB against the uncached samples of the same seeds
    speedup: float | None  # median batch time: compiled baseline / this method
    speedup_eager: float  # median batch time: uncompiled model (as the hooks run) / this method
    skipped: float  # fraction of attention/MLP computations skipped
    fid_seeds: list[float]  # per seed, in setup.seeds order: for paired differences


def scheduler(kind: str) -> Any:
    """A sampler with the training noise schedule. clip_sample is off (train.py's config):
    with DDPM's default clipping, the guided x0 estimate near t = T (sqrt(alpha_bar) ~ 0.006)
    is clipped hard and classifier-free guidance is erased."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from .train import make_scheduler

    train = make_scheduler().config
    if kind == "ddim":
        return DDIMScheduler.from_config(train)
    if kind == "dpm":
        return DPMSolverMultistepScheduler.from_config(train)
    raise ValueError(f"unknown sampler {kind!r}; valid: 'ddim', 'dpm'")


def sample(model: Callable[..., Any], labels: torch.Tensor, seed: int, kind: str, steps: int,
           cfg: float, batch: int, before: Callable[[], None] | None = None,
           times: list[float] | None = None) -> torch.Tensor:
    """Images [N, 1, 8, 8] in [-1, 1] for `labels`, from noise drawn with `seed`; the
    wall-clock time of each batch (one whole sampling loop) is appended to `times`."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), 1, 8, 8, generator=g)
    out = []
    for lo in range(0, len(labels), batch):
        t0 = time.perf_counter()
        if before is not None:
            before()  # a new generation for stateful methods
        y = labels[lo:lo + batch]
        x = noise[lo:lo + batch]
        sched = scheduler(kind)
        sched.set_timesteps(steps)
        y_in = torch.cat([y, torch.full_like(y, NULL_CLASS)])  # cond, then uncond
        for t in sched.timesteps:
            x_in = torch.cat([x, x])  # [2b, 1, 8, 8]
            eps = model(x_in, timestep=t.expand(len(x_in)), class_labels=y_in).sample
            cond, uncond = eps.chunk(2)
            x = sched.step(uncond + cfg * (cond - uncond), t, x).prev_sample
        out.append(x.clamp(-1, 1))
        if times is not None:
            times.append(time.perf_counter() - t0)
    return torch.cat(out)


@dataclass
class Method:
    name: str
    interval: int | None
    model: Callable[..., Any]
    before: Callable[[], None] | None  # start of a generation, for stateful hooks
    skipped: Callable[[], float]  # measured fraction of site computations skipped


class _Peer:
    """A diffusers hook model that also counts its calls and tells PAB the timestep."""

    def __init__(self, model: torch.nn.Module, kind: str, n: int, sites: list[str]):
        self.model, self.calls, self.t = model, 0, 999
        self.counter = SiteCounter(model, sites)  # before the hooks: counts real computes
        self.hook = DiffusersHook(model, kind, n, timestep=self.timestep, site_paths=sites)

    def timestep(self) -> int:
        return self.t

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.t = int(kwargs["timestep"][0])
        return self.hook(*args, **kwargs)

    def skipped(self) -> float:
        return self.counter.skipped(self.calls)


def site_paths(model: torch.nn.Module) -> list[str]:
    x = torch.zeros(2, 1, 8, 8)
    gm, _ = capture(model, x, timestep=torch.ones(2), class_labels=torch.zeros(2, dtype=torch.long))
    torch._dynamo.reset()
    return [s.module_path for s in locate(gm, module_paths(model)).sites]


def _methods(base: torch.nn.Module, setup: EvalSetup, steps: int,
             log: Callable[[str], None]) -> list[Method]:
    compiled = torch.compile(base, fullgraph=True, dynamic=False) if setup.compile else base
    methods = [Method("baseline", None, compiled, None, lambda: 0.0)]
    n_peer = setup.peer_interval
    for n in setup.intervals if "fora" in setup.methods else ():
        fast = api.transform(base, interval=n, num_steps=steps,
                             compiler="inductor" if setup.compile else "eager")
        stats = fast._fora_runtime.stats
        methods.append(Method("fora", n, fast, None,
                              functools.partial(lambda st: st.reuses / max(1, st.calls), stats)))
    hooks = [kind for kind in ("taylorseer", "pab") if kind in setup.methods]
    sites = site_paths(base) if hooks else []
    for kind in hooks:
        try:
            peer = _Peer(copy.deepcopy(base), kind, n_peer, sites)
        except ImportError as e:  # TaylorSeer is newer than some supported diffusers
            log(f"{kind}: skipped, this diffusers lacks it ({e})")
            continue
        methods.append(Method(kind, n_peer, peer, peer.hook.start_generation, peer.skipped))
    for name in ("cache-dit", "cache-dit+taylorseer"):
        if name not in setup.methods:
            continue
        if not peers_cachedit.available():  # an optional extra: skipped, and said so
            log(f"{name}: skipped, cache-dit is not installed (pip install cache-dit)")
            continue
        cd = peers_cachedit.CacheDitPeer(copy.deepcopy(base), n_peer, steps,
                                         calibrator="taylorseer" if "+" in name else None)
        methods.append(Method(name, n_peer, cd, cd.start_generation, cd.skipped))
    return methods


@dataclass
class Judge:
    """The metrics' reference: the digits classifier and the training split's features."""

    clf: DigitsClassifier
    train_features: torch.Tensor
    floor: float  # FID of the held-out real split: the best a sampler can expect

    @classmethod
    def build(cls) -> Judge:
        train_x, train_y, test_x, _ = load_digits_split()
        clf = train_classifier(train_x, train_y)
        with torch.no_grad():
            train_f = clf.features(train_x)
            return cls(clf, train_f, fid(train_f, clf.features(test_x)))

    @torch.no_grad()
    def score(self, imgs: torch.Tensor, labels: torch.Tensor,
              ref: torch.Tensor | None = None) -> dict[str, float]:
        """fid, is_, precision, recall, class_acc, and psnr (dB, mean) against `ref`."""
        f, p = self.clf.features(imgs), self.clf.probs(imgs)
        prec, rec = precision_recall(self.train_features, f)
        out = {"fid": fid(self.train_features, f), "is_": inception_score(p),
               "precision": prec, "recall": rec, "class_acc": class_accuracy(p, labels)}
        if ref is not None:  # identical samples have infinite PSNR: cap at 100 dB
            out["psnr"] = float(psnr(imgs, ref).clamp(max=100).mean())
        return out


def evaluate(setup: EvalSetup, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.manual_seed(0)
    judge = Judge.build()
    base = load_trained()
    labels = torch.arange(setup.samples) % 10
    results: list[Result] = []
    grids: dict[str, torch.Tensor] = {}
    started = time.perf_counter()
    for kind, steps in setup.samplers:
        eager_times: list[float] = []  # the uncompiled model, timing only
        with torch.no_grad():
            sample(base, labels[:setup.batch * setup.eager_batches], -1, kind, steps, setup.cfg,
                   setup.batch, times=eager_times)
        eager_time = statistics.median(eager_times)
        baseline_imgs: dict[int, torch.Tensor] = {}
        base_time = None
        for method in _methods(base, setup, steps, log):
            name, n, model, before = method.name, method.interval, method.model, method.before
            scores: list[dict[str, float]] = []
            times: list[float] = []  # per batch, all seeds: the median is robust to a hiccup
            with torch.no_grad():  # warm-up, once per method: compiles, first-call costs
                sample(model, labels[:setup.batch], -1, kind, steps, setup.cfg, setup.batch,
                       before)
            for seed in setup.seeds:
                with torch.no_grad():
                    imgs = sample(model, labels, seed, kind, steps, setup.cfg, setup.batch,
                                  before, times)
                scores.append(judge.score(imgs, labels, baseline_imgs.get(seed)))
                if name == "baseline":
                    baseline_imgs[seed] = imgs
                if seed == setup.seeds[0] and kind == "ddim" and (n is None or n in (3, 6)) \
                        and name in ("baseline", "fora"):
                    grids[f"{name}" + (f" N={n}" if n else "")] = imgs[:40]
                log(f"  {kind}-{steps} {name} N={n or '-'} seed {seed}: FID "
                    f"{scores[-1]['fid']:.2f} ({time.perf_counter() - started:.0f} s elapsed)")
            t = statistics.median(times)
            base_time = t if name == "baseline" else base_time
            avg = {key: statistics.mean(sc[key] for sc in scores) for key in scores[0]}
            r = Result(kind, steps, name, n, avg["fid"],
                       statistics.pstdev(sc["fid"] for sc in scores), avg["is_"],
                       avg["precision"], avg["recall"], avg["class_acc"], avg.get("psnr"),
                       base_time / t if base_time else None, eager_time / t, method.skipped(),
                       [sc["fid"] for sc in scores])
            results.append(r)
            log(f"{kind}-{steps} {name:<10} N={n or '-'}  FID {r.fid:.2f}±{r.fid_std:.2f}  "
                f"IS {r.is_:.2f}  P {r.precision:.2f} R {r.recall:.2f}  acc {r.class_acc:.3f}  "
                f"PSNR {r.psnr or float('nan'):.1f}  x{r.speedup or 0:.2f} "
                f"(x{r.speedup_eager:.2f} vs eager)")
    return {"setup": asdict(setup), "fid_floor_heldout": judge.floor,
            "rows": [asdict(r) for r in results], "grids": grids}


def paired_fid_delta(report: dict[str, Any], row: dict[str, Any]) -> tuple[float, float] | None:
    """Mean and spread over seeds of (row's FID - the baseline's FID) on the same seed. The
    seeds' shared variation cancels, so this separates methods that the ± column cannot.
    None for reports written before per-seed FIDs were kept."""
    base = [r for r in report["rows"] if r["method"] == "baseline"
            and (r["sampler"], r["steps"]) == (row["sampler"], row["steps"])]
    if row["method"] == "baseline" or not base or "fid_seeds" not in row \
            or "fid_seeds" not in base[0]:
        return None
    diffs = [a - b for a, b in zip(row["fid_seeds"], base[0]["fid_seeds"], strict=True)]
    return statistics.mean(diffs), statistics.pstdev(diffs)


def markdown(report: dict[str, Any]) -> str:
    cols = ["sampler", "method", "N", "FID", "± (seeds)", "ΔFID paired", "IS", "precision",
            "recall", "class acc", "PSNR dB", "speedup", "vs eager", "skipped"]
    lines = [f"Held-out real FID (floor): {report['fid_floor_heldout']:.2f}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        delta = paired_fid_delta(report, r)
        lines.append("| " + " | ".join([
            f"{r['sampler']}-{r['steps']}", r["method"], str(r["interval"] or ""),
            f"{r['fid']:.2f}", f"{r['fid_std']:.2f}",
            "" if delta is None else f"{delta[0]:+.2f} ± {delta[1]:.2f}",
            f"{r['is_']:.2f}",
            f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['class_acc']:.3f}",
            "" if r["psnr"] is None else f"{r['psnr']:.1f}",
            "" if r["speedup"] is None else f"{r['speedup']:.2f}×",
            f"{r['speedup_eager']:.2f}×",
            f"{r['skipped']:.0%}"]) + " |")
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], json_path: str | None, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grids = report.pop("grids")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    render(report, out_dir)
    write_grid(grids, out / "samples.png")


def merge(paths: list[str]) -> dict[str, Any]:
    """One report from the JSON files of several runs (e.g. the optional cache-dit rows run
    later): every method row of each file, with the speedups of its own run; the baseline row
    of the first file only. Refuses runs whose sample settings differ, because then the
    baselines' samples, and so PSNR and FID, would not be comparable."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("samples", "seeds", "samplers", "cfg", "batch", "compile")
    first = reports[0]
    for p, r in zip(paths[1:], reports[1:], strict=True):
        diff = [k for k in keys if r["setup"][k] != first["setup"][k]]
        if diff:
            raise ValueError(f"{p} was run with other settings than {paths[0]}: {diff}")
    rows = list(first["rows"]) + [row for r in reports[1:] for row in r["rows"]
                                  if row["method"] != "baseline"]
    samplers = list(dict.fromkeys((r["sampler"], r["steps"]) for r in rows))
    rows.sort(key=lambda r: samplers.index((r["sampler"], r["steps"])))  # stable: runs' order
    return {"setup": first["setup"], "fid_floor_heldout": first["fid_floor_heldout"],
            "rows": rows, "merged_from": [str(p) for p in paths]}


def render(report: dict[str, Any], out_dir: str) -> None:
    """quality.md and the plot from a saved (or merged) report; no sample grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(markdown(report) + "\n")
    _plot(report, out / "quality_vs_speedup.png")


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(f"{r['sampler']}-{r['steps']}" for r in report["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    style = {m: (f"C{i}", mk) for i, (m, mk) in enumerate(zip(methods, "osd^v<>p*", strict=False))}
    # top row: FID (the distribution); bottom row: PSNR against the uncached samples of the
    # same seeds (faithfulness; FID can fall below the baseline's when samples shift)
    fig, axes = plt.subplots(2, len(samplers), figsize=(5 * len(samplers), 7), dpi=120,
                             squeeze=False, sharey="row")
    for col, sampler in enumerate(samplers):  # one column per sampler
        fid_ax, psnr_ax = axes[0][col], axes[1][col]
        for method in methods:
            rows = [r for r in report["rows"]
                    if f"{r['sampler']}-{r['steps']}" == sampler and r["method"] == method]
            if not rows:
                continue
            xs = [r["speedup"] or 1.0 for r in rows]
            color, marker = style[method]
            line = "-" if len(rows) > 1 else "none"
            # error bars: spread over seeds; every method samples the same seeds
            fid_ax.errorbar(xs, [r["fid"] for r in rows], yerr=[r["fid_std"] for r in rows],
                            color=color, marker=marker, capsize=2, label=method, linestyle=line)
            if method != "baseline":
                psnr_ax.plot(xs, [r["psnr"] for r in rows], color=color, marker=marker,
                             label=method, linestyle=line)
            for r, x in zip(rows, xs, strict=True):
                if r["interval"] and method == "fora":
                    for ax, y in ((fid_ax, r["fid"]), (psnr_ax, r["psnr"])):
                        ax.annotate(f"N={r['interval']}", (x, y), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
        fid_ax.axhline(report["fid_floor_heldout"], color="grey", linestyle=":",
                       label="held-out real digits")
        fid_ax.set_title(sampler, fontsize=9)
        psnr_ax.set_xlabel("wall-clock speedup over the compiled uncached model (CPU)",
                           fontsize=8)
        fid_ax.legend(fontsize=7)
        psnr_ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FID (digits-classifier features), lower is better")
    axes[1][0].set_ylabel("PSNR vs uncached samples, dB (higher = closer)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_grid(grids: dict[str, torch.Tensor], path: Path, scale: int = 4, per_row: int = 10,
          rows_per_method: int = 2) -> None:
    """Same seeds and labels in every block: column c shows class c (labels cycle 0..9)."""
    from PIL import Image, ImageDraw

    if not grids:
        return
    cell, label_w = 8 * scale + 2, 80
    height = len(grids) * (rows_per_method * cell + 6)
    img = Image.new("L", (label_w + per_row * cell, height), 255)
    draw = ImageDraw.Draw(img)
    for i, (name, imgs) in enumerate(grids.items()):
        top = i * (rows_per_method * cell + 6)
        draw.text((4, top + cell // 2), name, fill=0)
        for j in range(min(len(imgs), per_row * rows_per_method)):
            px = ((imgs[j, 0] + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
            tile = Image.fromarray(px).resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + (j % per_row) * cell + 1, top + (j // per_row) * cell + 1))
    img.save(path)
