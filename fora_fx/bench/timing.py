"""How `fora-fx bench` times: whole loops, single refresh / reuse steps, and a kernel-level
profile of each, device-synchronized."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import api, guards
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
    """

    def __init__(self) -> None:
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


def measure(fn: Callable[[], torch.Tensor],
            setup: Setup) -> tuple[float, float, torch.Tensor, int]:
    """(warm-up seconds, median loop seconds, output, Dynamo graphs compiled by the end of
    the warm-up). Peak memory is reset after the warm-up loop, so it is the steady state's,
    not the compiler's."""
    from torch._dynamo.utils import counters

    out: list[torch.Tensor] = []
    warmup = timed(lambda: out.append(fn()), setup)
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm_graphs = int(counters["stats"].get("unique_graphs", 0))
    loop = statistics.median(timed(lambda: out.append(fn()), setup)
                             for _ in range(setup.repeats))
    return warmup, loop, out[-1], warm_graphs


def unguarded(fn: Callable[[], torch.Tensor], setup: Setup) -> float | None:
    """Median loop seconds with Dynamo's guard evaluation skipped (None if this torch
    cannot)."""
    stance = guards.unguarded()
    if stance is None:
        return None
    with torch.no_grad(), stance:
        return statistics.median(timed(fn, setup) for _ in range(setup.repeats))


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


