"""Eager FORA on an unmodified diffusers pipeline: the oracle for transformed pipelines.

Written independently of fora_fx/runtime.py, from the rules in issue 3:
  * a pipeline call is a generation (the scheduler builds a new `timesteps` tensor);
  * the step is `scheduler.step_index` (None before the first step -> begin_index or 0), or
    the number of earlier calls of the same branch when the scheduler has no step_index;
  * the last step (len(timesteps) - 1) recomputes;
  * calls within one step are separate branches, named by `transformer.cache_context(name)`
    or else by their order within the step; each branch has its own cache.
"""

from __future__ import annotations

import contextlib

import torch
from reference import _clone, refresh_schedule


class PipelineEagerFora:
    def __init__(self, pipe, site_paths: list[str], interval: int, warmup_steps: int = 1,
                 component: str = "transformer"):
        self.pipe = pipe
        self.interval, self.warmup_steps = interval, warmup_steps
        self.model = getattr(pipe, component)  # Wan 2.2's second expert: "transformer_2"
        self.cache: dict[tuple[str, str], object] = {}
        self.log: list[tuple[str, int, bool]] = []  # (branch, step, refreshed) per call
        self._branch, self._refresh = "default", True
        self._context: str | None = None
        self._token = None
        self._step_key, self._calls_this_step = None, 0
        self._counts: dict[str, int] = {}
        self._refreshed_branches: set[str] = set()
        self._sites = {p: self.model.get_submodule(p) for p in site_paths}
        for path, module in self._sites.items():
            module.forward = self._wrap(path, module.forward)
        self.model.cache_context = self._cache_context  # instance attribute, removed later
        self._hook = self.model.register_forward_pre_hook(self._before_call)

    @contextlib.contextmanager
    def _cache_context(self, name, **kwargs):
        previous, self._context = self._context, name
        try:
            yield
        finally:
            self._context = previous

    def _before_call(self, module, args):
        scheduler = self.pipe.scheduler
        if scheduler.timesteps is not self._token:
            self._token = scheduler.timesteps
            self.cache.clear()
            self._refreshed_branches.clear()
            self._counts.clear()
            self._step_key, self._calls_this_step = None, 0
        step = None
        if hasattr(type(scheduler), "step_index"):
            step = scheduler.step_index
            if step is None:
                step = getattr(scheduler, "begin_index", None) or 0
        if self._context is not None:
            branch = self._context
        elif step is not None:
            if step != self._step_key:
                self._step_key, self._calls_this_step = step, 0
            branch = f"call{self._calls_this_step}"
            self._calls_this_step += 1
        else:
            branch = "default"
        if step is None:
            step = self._counts.get(branch, 0)
        self._counts[branch] = self._counts.get(branch, 0) + 1
        n = len(scheduler.timesteps)
        # A branch's first call in a generation recomputes (its cache is empty). Not every
        # site runs in every branch: SD3's skip-layer call skips whole blocks.
        first = branch not in self._refreshed_branches
        self._refresh = first or refresh_schedule(step, self.interval, self.warmup_steps, n)
        self._refreshed_branches.add(branch)
        self._branch = branch
        self.log.append((branch, step, self._refresh))

    def _wrap(self, path, forward):
        def wrapped(*args, **kwargs):
            key = (self._branch, path)
            if self._refresh:
                out = forward(*args, **kwargs)
                self.cache[key] = _clone(out)
                return out
            return _clone(self.cache[key])

        return wrapped

    def __call__(self, **kwargs):
        with torch.no_grad():
            return self.pipe(**kwargs)

    def remove(self) -> None:
        self._hook.remove()
        for module in self._sites.values():
            del module.forward
        del self.model.cache_context
        self.cache.clear()
