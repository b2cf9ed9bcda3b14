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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import api, peers_cachedit
from ..bench.progress import bar
from ..bench.timing import interleave
from ..capture import capture, module_paths
from ..config import ForaConfig
from ..passes import locate
from ..peers import DiffusersHook, SiteCounter
from ..schedule import Schedule, choose
from .classifier import DigitsClassifier, train_classifier
from .data import load_digits_split
from .metrics import class_accuracy, fid, inception_score, precision_recall, psnr
from .model import NULL_CLASS, load_trained
from .report import markdown, merge, paired_fid_delta, render, write_grid, write_outputs

__all__ = ["METHODS", "EvalSetup", "Judge", "evaluate", "markdown", "merge",
           "paired_fid_delta", "render", "sample", "write_grid", "write_outputs"]

METHODS = ("fora", "taylor1", "taylor2", "fora-cal", "taylor2-cal", "taylorseer", "pab",
           "cache-dit", "cache-dit+taylorseer")
# fora_fx's own variants, at each of setup.intervals: forecast order (0: FORA's replay) and
# whether the full steps are calibrated (as many as the interval rule makes at that N).
OURS = {"fora": (0, False), "taylor1": (1, False), "taylor2": (2, False),
        "fora-cal": (0, True), "taylor2-cal": (2, True)}
CALIBRATION_SEED = 1000  # the calibration generation's noise: none of the scored seeds


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
    speedup: float | None  # median over rounds of baseline time / this method's, same round
    speedup_eager: float  # the same against the uncompiled model (as the hooks run)
    skipped: float  # fraction of attention/MLP computations skipped
    fid_seeds: list[float]  # per seed, in setup.seeds order: for paired differences
    speedup_lo: float | None = None  # the range of the per-round speedups
    speedup_hi: float | None = None


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
           times: list[float] | None = None, first: int = 0) -> torch.Tensor:
    """Images [N, 1, 8, 8] in [-1, 1] for `labels`, from noise drawn with `seed`; the
    wall-clock time of each batch (one whole sampling loop) is appended to `times`. `first`:
    `labels` start at sample `first` of the seed's draw (a batch of a larger set gets the
    noise it has within the whole set)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(first + len(labels), 1, 8, 8, generator=g)[first:]
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


def _calibrate(base: torch.nn.Module, setup: EvalSetup, kind: str,
               steps: int) -> tuple[float, ...]:
    """The per-step change curve of one uncached generation (fora_fx.calibrate), on one batch
    of CALIBRATION_SEED's noise: the schedule is chosen before sampling, from none of the
    scored samples."""
    from ..calibrate import calibrate

    labels = torch.arange(setup.batch) % 10
    schedule = calibrate(base, lambda m: sample(m, labels, CALIBRATION_SEED, kind, steps,
                                                setup.cfg, setup.batch), budget=steps)
    return schedule.changes[steps]


def _methods(base: torch.nn.Module, setup: EvalSetup, kind: str, steps: int,
             log: Callable[[str], None]) -> list[Method]:
    compiled = torch.compile(base, fullgraph=True, dynamic=False) if setup.compile else base
    methods = [Method("baseline", None, compiled, None, lambda: 0.0)]
    n_peer = setup.peer_interval
    curve: tuple[float, ...] = ()
    for name, (order, calibrated) in OURS.items():
        if name not in setup.methods:
            continue
        if calibrated and not curve:
            curve = _calibrate(base, setup, kind, steps)
        for n in setup.intervals:
            options: dict[str, Any] = {} if calibrated else {"interval": n}
            if order:
                options.update(forecast="taylor", order=order)
            if calibrated:  # the uniform rule's number of full steps, placed by calibration
                full = sum(ForaConfig(interval=n, num_steps=steps).refreshes(k)
                           for k in range(steps))
                options["schedule"] = Schedule({steps: choose(curve, full)}, {steps: curve})
            fast = api.transform(base, num_steps=steps,
                                 compiler="inductor" if setup.compile else "eager", **options)
            methods.append(Method(name, n, fast, None, functools.partial(
                lambda f: (st := api.stats(f)).reuses / max(1, st.calls), fast)))
    hooks = [hook for hook in ("taylorseer", "pab") if hook in setup.methods]
    sites = site_paths(base) if hooks else []
    for hook in hooks:
        try:
            peer = _Peer(copy.deepcopy(base), hook, n_peer, sites)
        except ImportError as e:  # TaylorSeer is newer than some supported diffusers
            log(f"{hook}: skipped, this diffusers lacks it ({e})")
            continue
        methods.append(Method(hook, n_peer, peer, peer.hook.start_generation, peer.skipped))
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


def evaluate(setup: EvalSetup, log: Callable[[str], None] = print,
             quiet: bool = False) -> dict[str, Any]:
    """Every method samples every (seed, batch) in one timing round (bench.timing.interleave,
    the baseline timed twice per round as the control): a speedup is the median of per-round
    ratios, with its range, and each sampler's timing says whether the run is reliable."""
    torch.manual_seed(0)
    judge = Judge.build()
    base = load_trained()
    labels = torch.arange(setup.samples) % 10
    per_seed = -(-setup.samples // setup.batch)  # batches per seed
    rounds = [(seed, b) for seed in setup.seeds for b in range(per_seed)]
    results: list[Result] = []
    grids: dict[str, torch.Tensor] = {}
    timings: dict[str, Any] = {}
    started = time.perf_counter()
    for kind, steps in setup.samplers:
        methods = _methods(base, setup, kind, steps, log)
        run = {_key(m): functools.partial(_round, m, labels, rounds, kind, steps, setup)
               for m in methods}
        with bar(len(methods) + 1, f"{kind}-{steps} compiling", quiet, unit="model") as b:
            for m in [*methods, Method("eager", None, base, None, lambda: 0.0)]:
                b.set_postfix_str(_key(m))  # warm-up: compiles, first-call costs
                with torch.no_grad():
                    sample(m.model, labels[:setup.batch], -1, kind, steps, setup.cfg,
                           setup.batch, m.before)
                b.update()
        with torch.no_grad(), bar(len(rounds) * (len(run) + 1), f"{kind}-{steps}", quiet) as b:
            def tick(name: str, r: int, b: Any = b) -> None:
                b.set_postfix_str(f"round {r + 1}/{len(rounds)}: {name}")
                b.update()

            timing = interleave(run, len(rounds), "baseline", repeat_baseline=True, keep=True,
                                progress=tick)
            # the uncompiled model, timing only, against the baseline in the same rounds
            eager = interleave({"baseline": run["baseline"], "eager": functools.partial(
                _round, Method("eager", None, base, None, lambda: 0.0), labels, rounds, kind,
                steps, setup)}, min(setup.eager_batches, len(rounds)), "baseline")
        timings[f"{kind}-{steps}"] = {**timing.to_json(), "eager": eager.to_json()}
        log(f"{kind}-{steps} {timing.verdict()}")
        baseline_imgs: dict[int, torch.Tensor] = {}
        for m in methods:
            name, n = m.name, m.interval
            outs = timing.outputs[_key(m)]
            scores: list[dict[str, float]] = []
            for seed in setup.seeds:
                imgs = torch.cat([o for o, (s, _) in zip(outs, rounds, strict=True)
                                  if s == seed])
                scores.append(judge.score(imgs, labels, baseline_imgs.get(seed)))
                if name == "baseline":
                    baseline_imgs[seed] = imgs
                if seed == setup.seeds[0] and kind == "ddim" and (n is None or n in (3, 6)) \
                        and name in ("baseline", "fora"):
                    grids[f"{name}" + (f" N={n}" if n else "")] = imgs[:40]
            sp = timing.speedups.get(_key(m))
            speedup = timing.speedup(_key(m))
            avg = {key: statistics.mean(sc[key] for sc in scores) for key in scores[0]}
            r = Result(kind, steps, name, n, avg["fid"],
                       statistics.pstdev(sc["fid"] for sc in scores), avg["is_"],
                       avg["precision"], avg["recall"], avg["class_acc"], avg.get("psnr"),
                       speedup, speedup / eager.speedup("eager"), m.skipped(),
                       [sc["fid"] for sc in scores], sp.lo if sp else None,
                       sp.hi if sp else None)
            results.append(r)
            log(f"{kind}-{steps} {name:<10} N={n or '-'}  FID {r.fid:.2f}±{r.fid_std:.2f}  "
                f"IS {r.is_:.2f}  P {r.precision:.2f} R {r.recall:.2f}  acc {r.class_acc:.3f}  "
                f"PSNR {r.psnr or float('nan'):.1f}  {timing.describe(_key(m))} "
                f"(x{r.speedup_eager:.2f} vs eager)  [{time.perf_counter() - started:.0f} s]")
    return {"setup": asdict(setup), "fid_floor_heldout": judge.floor,
            "rows": [asdict(r) for r in results], "timing": timings, "grids": grids}


def _key(m: Method) -> str:
    return m.name + (f" N={m.interval}" if m.interval and m.name != "baseline" else "")


def _round(m: Method, labels: torch.Tensor, rounds: list[tuple[int, int]], kind: str,
           steps: int, setup: EvalSetup, r: int) -> torch.Tensor:
    """Round r of method m: batch b of seed s."""
    seed, b = rounds[r]
    lo = b * setup.batch
    return sample(m.model, labels[lo:lo + setup.batch], seed, kind, steps, setup.cfg,
                  setup.batch, m.before, first=lo)
