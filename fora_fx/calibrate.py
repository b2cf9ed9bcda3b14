"""`fora_fx.calibrate`: a schedule measured on the user's own model and inputs (issue 18).

One uncached generation, offline, before sampling:

1. Sites. The first model call of `run` is stopped (a pre-hook raises) and its inputs are
   kept; the model is transformed with `interval=1` and the eager compiler, `fora_fx.explain`
   lists the cached sites for those inputs (the same sites a later transform with the same
   `sites` / `exclude` / `piecewise` caches), and the model is restored.
2. Measure. `run` runs again, on the untransformed model, with a forward hook on each
   site's module. Each call is numbered exactly as the runtime numbers it (a private
   Runtime does the counting: the pipeline scheduler's step and guidance branches, or
   counted calls), and each site's output is compared with the same branch's previous
   output: r = ||out_k - out_prev|| / ||out_prev|| (L2 over all of the output's tensors, in
   float32). The step's change d_k is the mean of r over its sites and branches: FORA
   refreshes every site together, the replay error adds over sites, and relative values
   keep sites of a large magnitude from drowning the others.
3. Choose. `fora_fx.schedule.choose` picks the full steps for the budget from the curve d.

Cost: one uncached generation (plus the stopped first call and one eager capture), with one
previous output kept per site and branch (the size of FORA's own cache). Calibration may
read device values (it is offline); the schedule it returns costs nothing at sampling time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from . import tuning
from .config import ForaConfig
from .pipelines import is_pipeline, transformer_names
from .runtime import Runtime
from .schedule import Schedule, choose
from .steps import PipelineSteps


class _Stop(BaseException):
    """Raised by the capture pre-hook to stop `run` after its first model call's inputs (a
    BaseException, so that a `run` catching Exception does not swallow it)."""


def _models(target: Any) -> list[torch.nn.Module]:
    if is_pipeline(target):
        found = [getattr(target, n, None) for n in transformer_names(target)]
        models = [m for m in found if isinstance(m, torch.nn.Module)]
        if not models:
            raise TypeError(f"fora_fx.calibrate: {type(target).__name__} has no `transformer`")
    elif isinstance(target, torch.nn.Module):
        models = [target]
    else:
        raise TypeError("fora_fx.calibrate expects a torch.nn.Module or a diffusers pipeline, "
                        f"got {type(target).__name__}")
    if any(getattr(m, "_fora", None) is not None for m in models):
        raise TypeError("fora_fx.calibrate measures the untransformed model: pass the original "
                        "(fora_fx.restore returns it)")
    return models


def _site_paths(target: Any, models: list[torch.nn.Module], run: Callable[[Any], Any],
                config: ForaConfig) -> list[str]:
    """The module paths `fora_fx.explain` lists for the first model call of `run`."""
    from .api import restore, transform
    from .explain import explain

    seen: list[tuple[torch.nn.Module, tuple, dict[str, Any]]] = []

    def stop(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen.append((module, args, kwargs))
        raise _Stop

    hooks = [m.register_forward_pre_hook(stop, with_kwargs=True) for m in models]
    try:
        run(target)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ValueError("fora_fx.calibrate: `run` never called the model; it must run one "
                         "generation, e.g. run=lambda pipe: pipe(prompt, num_inference_steps=20)")
    model, args, kwargs = seen[0]
    probe = config.replace(interval=1, warmup_steps=1, refresh_last=True, schedule=None,
                           num_steps=None, compiler="eager", mode=None)
    fast = transform(model, probe)
    try:
        found = explain(fast, *args, **kwargs)
    finally:
        restore(fast)  # also takes piecewise hook-site wrappers off the model
    # Piecewise hook sites are cached around their module call: measured the same way.
    return [s.module_path for s in found.sites] + found.hooked


def _norm2(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(torch.linalg.vector_norm(t.float()) ** 2 for t in tensors)  # type: ignore[return-value]


def calibrate(target: Any, run: Callable[[Any], Any], budget: int | float,
              config: ForaConfig | None = None) -> Schedule:
    """A schedule for `target` (a model or pipeline) measured on one uncached `run`.

    run:    performs one generation given `target`, e.g. `lambda pipe: pipe(prompt,
            num_inference_steps=20)` or `lambda model: my_sampler(model, x0, steps=20)`.
            Called twice: its first model call is stopped (to find the sites), then it runs
            whole, uncached.
    budget: an int K: the K full steps that minimise the accumulated replay error; a float:
            the fewest full steps keeping every replayed step's accumulated change <= budget.
            Step 0 is always full. See fora_fx.schedule.choose.
    config: the ForaConfig whose `sites` / `exclude` / `piecewise` select the sites measured
            (default: ForaConfig()); for a model, its num_steps numbers the calls as the
            runtime will.

    Returns a Schedule for the generation length of `run` (the pipeline's scheduler's, or
    the number of model calls), with the measured curve in `.changes`: pass it as
    `ForaConfig(schedule=...)`, print it (`.describe()` adds the curve), save it
    (`.to_json()`). Leaves no hook behind and the model untransformed.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):  # before any run
        raise TypeError(f"fora_fx.calibrate: budget must be an int (full steps) or a float "
                        f"(error bound), got {budget!r}")
    config = config or ForaConfig()
    models = _models(target)
    paths = _site_paths(target, models, run, config)
    # The runtime's own step numbering, on private Runtimes that run nothing: one per model,
    # sharing the pipeline's steps as a transformed pipeline's transformers do.
    source = PipelineSteps(target) if is_pipeline(target) else None
    counting = config.replace(interval=1, warmup_steps=1, refresh_last=True, schedule=None)
    runtimes = [Runtime(counting, tuning.current(), source) for _ in models]
    where: dict[str, Any] = {}  # the current call: model index, branch, step, num_steps
    previous: dict[tuple[int, str, str], list[torch.Tensor]] = {}
    measured: dict[int, list[torch.Tensor]] = {}  # step -> relative changes of its sites
    lengths: set[int] = set()
    last = [-1]

    def enter(i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            branch, step, n = runtimes[i]._position()
            runtimes[i]._advance(branch, True, n, step)
            where.update(model=i, branch=branch.name, step=step)
            last[0] = max(last[0], step)
            if n is not None:
                lengths.add(n)
        return hook

    def leave(module: torch.nn.Module, args: tuple, out: Any) -> None:
        where.clear()  # a site module called between model calls is not measured

    def record(i: int, path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple, out: Any) -> None:
            if where.get("model") != i:
                return  # a site module called outside its model's call
            now = [t.detach() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            key = (i, where["branch"], path)
            before = previous.get(key)
            if before is not None and len(before) == len(now) and all(
                    a.shape == b.shape for a, b in zip(before, now, strict=True)):
                change = _norm2([a - b for a, b in zip(now, before, strict=True)]).sqrt()
                scale = _norm2(before).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
                measured.setdefault(where["step"], []).append(change / scale)
            previous[key] = [t.clone() for t in now]
        return hook

    hooks, sites = [], 0
    try:
        for i, model in enumerate(models):
            hooks.append(model.register_forward_pre_hook(enter(i)))
            hooks.append(model.register_forward_hook(leave))
            for path in paths:
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    continue  # a second expert without this block
                hooks.append(module.register_forward_hook(record(i, path)))
                sites += 1
        if not sites:
            raise ValueError(f"fora_fx.calibrate: no module found for the sites {paths}")
        with torch.no_grad():
            run(target)
    finally:
        for h in hooks:
            h.remove()
    if len(lengths) > 1:
        raise ValueError(f"fora_fx.calibrate: `run` made generations of {sorted(lengths)} "
                         "steps; calibrate one generation length at a time")
    n = lengths.pop() if lengths else last[0] + 1
    if n < 1:
        raise ValueError("fora_fx.calibrate: `run` never called the model")
    # One device->host read, at the end (calibration is offline anyway).
    values = {k: sum(float(r) for r in v) / len(v) for k, v in measured.items()}
    curve = tuple(0.0 if k == 0 else values.get(k, math.nan) for k in range(n))
    return Schedule({n: choose(curve, budget)}, {n: curve})
