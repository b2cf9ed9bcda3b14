"""How the project times: whole loops, single refresh / reuse steps, a kernel-level profile of
each, device-synchronized; and `interleave`, the one helper every reported speedup comes from
(the main job, `fora-fx eval`, `fora-fx bench`, the example timing scripts).

Why interleave: on a shared machine the load changes while a run goes on. Timing the baseline
in one block and each variant in its own block afterwards turns a load change into a speedup
(issue 19: interval=1, which never reuses, came out 3.33x). Round by round, every variant runs
once per round in rotating order, and a speedup is the median of per-round ratios against the
baseline run in the same round: a load change then slows both sides of a ratio alike.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import api
from .setup import Setup


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], setup: Setup) -> float:
    """Seconds for one call of `fn`, the device synchronized on both sides."""
    sync(setup.device)
    t0 = time.perf_counter()
    fn()
    sync(setup.device)
    return time.perf_counter() - t0


class CompileCaches:
    """A fresh Inductor / Triton cache directory per family of rows ("compiled", "fora_fx",
    "peers"), so that warm-up times compare compiles, not cache hits.

    Through one shared cache the first fora_fx row would find most of its kernels already
    built by the compiled row (its refresh graph is the plain graph plus cache stores), and a
    second process would find whole graphs from the first: its warm-up would say nothing about
    what compiling costs. Within a family the cache is kept: later fora_fx intervals compile
    the same two graphs and may reuse them. `prime` pays the process's one-time costs
    (imports, the compile worker pool, the device's context) before any row is timed, so the
    first compiled row does not carry them alone.

    `root` (or $FORA_BENCH_CACHE_DIR) keeps the families' caches between runs instead: a run
    then finds what its own family built in an earlier one, and its warm-up times measure
    cache hits (the tests use it; they assert on rows, not on warm-up times).
    """

    def __init__(self, root: str | None = None) -> None:
        root = root or os.environ.get("FORA_BENCH_CACHE_DIR")
        if root:  # kept between runs: each family finds what its own earlier runs built
            os.makedirs(root, exist_ok=True)
            self.root = root
        else:
            self.root = tempfile.mkdtemp(prefix="fora_bench_cache_")
            atexit.register(shutil.rmtree, self.root, ignore_errors=True)
        self.started: set[str] = set()

    @contextlib.contextmanager
    def use(self, family: str) -> Iterator[None]:
        from torch._inductor.utils import clear_caches

        if family not in self.started:  # in-memory caches hold what other families built
            self.started.add(family)
            clear_caches()
        where = os.path.join(self.root, family)
        saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = where
        os.environ["TRITON_CACHE_DIR"] = os.path.join(where, "triton")
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def prime(self, device: str, mode: str | None) -> None:
        def f(a: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(a @ a.T).sum(dim=-1)

        with self.use("prime"), torch.no_grad():
            compiled = torch.compile(f, dynamic=False, mode=mode)
            x = torch.randn(16, 16, device=device)
            for _ in range(3):  # CUDA graphs: warm-up, record, replay
                compiled(x)
        sync(device)
        torch._dynamo.reset()


def measure(fn: Callable[[], torch.Tensor], setup: Setup) -> tuple[float, torch.Tensor, int]:
    """(warm-up seconds, output, Dynamo graphs compiled by the end of the warm-up). One more
    loop, untimed, after peak memory is reset: the peak is the steady state's, not the
    compiler's. Loop times come from `paired`, interleaved with the eager model's."""
    from torch._dynamo.utils import counters

    out: list[torch.Tensor] = []
    warmup = timed(lambda: out.append(fn()), setup)
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_graphs = int(counters["stats"].get("unique_graphs", 0))
    out.append(fn())
    sync(setup.device)
    return warmup, out[-1], warm_graphs


def paired(fn: Callable[[], Any], eager: Callable[[], Any] | None, name: str,
           setup: Setup) -> Timings:
    """`setup.repeats` rounds of `fn` (variant `name`) and the eager model, interleaved: the
    eager model is the baseline every row of the bench is timed against in its own rounds, so
    a row's speedup does not depend on how busy the machine was when another row ran.
    `eager=None`: `fn` is the eager model; it is timed twice per round, a control."""
    if eager is None:
        return interleave({name: lambda r: fn()}, setup.repeats, name, repeat_baseline=True,
                          device=setup.device)
    return interleave({"eager": lambda r: eager(), name: lambda r: fn()}, setup.repeats,
                      "eager", device=setup.device)


def _unguarded() -> Any:
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except TypeError:  # a torch without the knob
        return None


def unguarded(fn: Callable[[], torch.Tensor], setup: Setup) -> Timings | None:
    """The loop with and without Dynamo's guard evaluation, interleaved (None if this torch
    cannot skip it): `speedup("unguarded")` is what the guards cost."""
    probe = _unguarded()
    if probe is None:
        return None
    with probe:  # set_stance applies when called: leaving the block restores the stance
        pass

    def skip(r: int) -> torch.Tensor:
        with _unguarded():  # a fresh stance per loop: one context manager, one entry
            return fn()

    with torch.no_grad():
        return interleave({"guarded": lambda r: fn(), "unguarded": skip}, setup.repeats,
                          "guarded", device=setup.device)


def step_times(fast: Any, x: torch.Tensor, kwargs: dict[str, Any], setup: Setup,
               reps: int = 5) -> tuple[float, float]:
    """Median ms of a refresh call (step 0) and a reuse call (step 1) of a transformed model."""
    t = torch.full((x.shape[0],), 500, device=x.device)
    refresh: list[float] = []
    reuse: list[float] = []
    with torch.no_grad():
        for _ in range(reps):
            api.reset(fast)
            for times in (refresh, reuse):
                times.append(1e3 * timed(lambda: fast(x, timestep=t, **kwargs), setup))
    api.reset(fast)
    return statistics.median(refresh), statistics.median(reuse)


def kernel_profile(fast: Any, x: torch.Tensor, kwargs: dict[str, Any], setup: Setup,
                   top: int = 15) -> dict[str, Any]:
    """Which kernels one refresh step (step 0) and one reuse step (step 1) run, how many and
    for how long: torch.profiler's device kernels on CUDA (CPU ops on a CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = setup.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = torch.full((x.shape[0],), 500, device=x.device)
    result: dict[str, Any] = {}
    with torch.no_grad():
        api.reset(fast)
        for variant in ("refresh", "reuse"):
            sync(setup.device)
            with profile(activities=activities) as prof:
                fast(x, timestep=t, **kwargs)
                sync(setup.device)
            events = [e for e in prof.key_averages()
                      if (e.device_type == DeviceType.CUDA) == cuda and e.count]
            ranked = sorted(((e.key, e.count, (e.self_device_time_total if cuda
                                              else e.self_cpu_time_total)) for e in events),
                            key=lambda kv: -kv[2])
            result[variant] = {
                "kernels": sum(c for _, c, _ in ranked),
                "device_us": sum(us for _, _, us in ranked),
                "top": [[name[:80], c, round(us, 1)] for name, c, us in ranked[:top]],
            }
    api.reset(fast)
    return result




def rotation(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Round r runs every variant once, starting with the r-th: each takes every position in
    turn, so what a position costs (a cold cache after a switch, a load that ramps up within a
    round) falls on all variants alike rather than on one."""
    k = len(names)
    return [[names[(r + i) % k] for i in range(k)] for r in range(rounds)]


@dataclass
class Spread:
    """A variant's per-round speedups over the baseline: median, range and quartiles."""

    median: float
    lo: float
    hi: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = sorted(values)
        q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
        return cls(statistics.median(v), v[0], v[-1], q[0], q[2])


@dataclass
class Timings:
    """What `interleave` measured. `times[name][r]`: seconds of `name` in round r."""

    baseline: str
    times: dict[str, list[float]]
    speedups: dict[str, Spread]  # every variant but the baseline
    controls: tuple[str, ...]  # variants whose true speedup is 1 (interval=1, the baseline again)
    noise: float  # half the range of the controls' per-round speedups (0 without controls)
    band: float  # max(floor, noise): how far a control's median may sit from 1
    unreliable: bool
    reasons: list[str]
    outputs: dict[str, list[Any]] = field(default_factory=dict)

    def seconds(self, name: str) -> float:
        return statistics.median(self.times[name])

    def speedup(self, name: str) -> float:
        return 1.0 if name == self.baseline else self.speedups[name].median

    def describe(self, name: str) -> str:
        """"2.51x (2.40-2.63 over 5 rounds)"."""
        if name == self.baseline:
            return "1.00x"
        s = self.speedups[name]
        return f"{s.median:.2f}x ({s.lo:.2f}-{s.hi:.2f} over {len(self.times[name])} rounds)"

    def verdict(self) -> str:
        """One line for the printed output: the noise band, and whether to trust the run."""
        if self.unreliable:
            return "UNRELIABLE timing: " + "; ".join(self.reasons)
        return (f"timing ok: controls {', '.join(self.controls)} within +-{self.band:.0%} of "
                f"1.00x (measured noise +-{self.noise:.0%})")

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "rounds": len(self.times[self.baseline]),
                "controls": list(self.controls), "noise": self.noise, "band": self.band,
                "unreliable": self.unreliable, "reasons": self.reasons,
                "times_s": self.times,
                "speedups": {k: vars(v) for k, v in self.speedups.items()}}


# Half the range of a control's per-round speedups beyond which a run times nothing: a
# variant 2x faster could not be told from the baseline.
MAX_NOISE = 0.5


def summarize(times: Mapping[str, Sequence[float]], baseline: str,
              controls: Sequence[str] = (), floor: float = 0.10) -> Timings:
    """Per-round speedups and the sanity check, from times alone (no clock: tests feed it).

    A control's true speedup is 1: interval=1 never reuses, the baseline timed again is the
    baseline. Its per-round speedups scatter by the run's noise; the noise is measured as half
    their range. The run is unreliable when a control's median sits further from 1 than that
    noise (and than `floor`, which absorbs small real differences, such as interval=1's own
    dispatch): then something other than noise, which interleaving would have cancelled,
    moved the times. Fewer than 3 rounds cannot measure the noise and are flagged too, and so
    is noise beyond `MAX_NOISE`: a control that ranged over 0.3-3x per round passes the median
    check, but no speedup of such a run means anything."""
    base = list(times[baseline])
    rounds = len(base)
    if any(len(t) != rounds for t in times.values()):
        raise ValueError("every variant needs one time per round")
    speedups = {name: Spread.of([b / x for b, x in zip(base, t, strict=True)])
                for name, t in times.items() if name != baseline}
    noise = max(((speedups[c].hi - speedups[c].lo) / 2 for c in controls), default=0.0)
    band = max(floor, noise)
    reasons = []
    if rounds < 3:
        reasons.append(f"{rounds} round(s) cannot measure the noise (3 or more can)")
    if noise > MAX_NOISE:
        reasons.append(f"the controls' per-round speedups spread +-{noise:.0%} (more than "
                       f"+-{MAX_NOISE:.0%}): the machine's speed changed too much between "
                       "rounds to time anything")
    for c in controls:
        s = speedups[c]
        if abs(s.median - 1) > band:
            reasons.append(f"{c} ran at {s.median:.2f}x (per round {s.lo:.2f}-{s.hi:.2f}), "
                           f"not within +-{band:.0%} of 1.00x")
    return Timings(baseline, {k: list(v) for k, v in times.items()}, speedups, tuple(controls),
                   noise, band, bool(reasons), reasons)


def interleave(variants: Mapping[str, Callable[[int], Any]], rounds: int, baseline: str,
               controls: Sequence[str] = (), repeat_baseline: bool = False,
               floor: float = 0.10, keep: bool = False, device: str = "cpu",
               clock: Callable[[], float] = time.perf_counter,
               progress: Callable[[str, int], None] | None = None) -> Timings:
    """Times `variants[name](r)` once per round r for `rounds` rounds, in `rotation` order,
    the device synchronized on both sides of each run. The callables are already warm
    (compiled): this times only. `repeat_baseline` times the baseline a second time per
    round, half a rotation away from the first, as a control. `keep`: each run's return value
    lands in `outputs[name][r]` (the main job and `fora-fx eval` sample while they time).
    `progress(name, r)` runs after each run (a progress bar's update)."""
    runs = dict(variants)
    controls = list(controls)
    if repeat_baseline:
        again = f"{baseline} (again)"
        names = list(runs)
        names.insert(len(names) // 2 + 1, again)  # the opposite side of the rotation
        runs = {n: runs[baseline] if n == again else runs[n] for n in names}
        controls.append(again)
    times: dict[str, list[float]] = {n: [0.0] * rounds for n in runs}
    outputs: dict[str, list[Any]] = {n: [None] * rounds for n in runs}
    for r, order in enumerate(rotation(list(runs), rounds)):
        for name in order:
            sync(device)
            t0 = clock()
            out = runs[name](r)
            sync(device)
            times[name][r] = clock() - t0
            if keep:
                outputs[name][r] = out
            if progress is not None:
                progress(name, r)
    result = summarize(times, baseline, controls, floor)
    if keep:
        result.outputs = outputs
    return result


def drift(groups: Mapping[str, Sequence[float]], floor: float = 0.10) -> list[str]:
    """The repeated-baseline check of a run whose rows each time the same baseline in rounds
    of their own (`fora-fx bench`: the eager model in every row). The noise is how far one
    row's baseline times spread (half their range, relative); a row whose baseline median
    sits further than that (and than `floor`) from the run's overall median ran on a machine
    whose speed had changed: its rounds and the others' do not compare. One reason a row."""
    meds = {k: statistics.median(v) for k, v in groups.items() if v}
    if len(meds) < 2:
        return []
    overall = statistics.median(meds.values())
    noise = max((max(v) - min(v)) / 2 / statistics.median(v) for v in groups.values() if v)
    band = max(floor, noise)
    return [f"the baseline took {m:.4g} s in the rounds of {k}, {m / overall:.2f}x the run's "
            f"median {overall:.4g} s (beyond +-{band:.0%})"
            for k, m in meds.items() if abs(m / overall - 1) > band]
