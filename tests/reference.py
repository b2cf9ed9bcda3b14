"""Plain eager FORA (arXiv 2407.01425) reference, used as the test oracle.

Each cached site is a module (attention or feed-forward) whose forward is
replaced, per instance, by a wrapper:

* on a refresh step the original forward runs and a clone of its output
  (a tensor or a tuple of tensors) is stored;
* on a reuse step the stored output is returned and nothing is computed.

A forward pre-hook on the top-level model decides refresh vs. reuse once per
model call from a step counter; a forward hook advances the counter after the
call (wrapping to 0 after ``num_steps`` calls when ``num_steps`` is given).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def refresh_schedule(
    step: int,
    interval: int,
    warmup_steps: int = 1,
    num_steps: int | None = None,
    refresh_last: bool = True,
) -> bool:
    """True iff the cached sites are recomputed at ``step``."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if step < warmup_steps:
        return True
    if step % interval == 0:
        return True
    return num_steps is not None and refresh_last and step == num_steps - 1


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone(o) for o in out)
    if isinstance(out, list):
        return [_clone(o) for o in out]
    if out is None:
        return None
    raise TypeError(f"cannot cache a site output of type {type(out).__name__}")


class EagerFora:
    def __init__(
        self,
        model: nn.Module,
        site_paths: list[str],
        interval: int,
        warmup_steps: int = 1,
        num_steps: int | None = None,
        refresh_last: bool = True,
    ):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.model = model
        self.site_paths = list(site_paths)
        self.interval = interval
        self.warmup_steps = warmup_steps
        self.num_steps = num_steps
        self.refresh_last = refresh_last

        self.step = 0  # step of the next (or current) model call
        self.refresh = True  # decision for the current model call
        self.refreshed: list[bool] = []  # one entry per model call since the last reset()
        self.cache: dict[str, object] = {}
        self._called: set[str] = set()  # sites already run in the current model call

        self._sites: dict[str, nn.Module] = {}
        self._had_instance_forward: dict[str, object] = {}
        for path in self.site_paths:
            module = model.get_submodule(path)
            self._sites[path] = module
            if "forward" in module.__dict__:
                self._had_instance_forward[path] = module.__dict__["forward"]
            module.forward = self._make_forward(path, module.forward)

        self._hooks = [
            model.register_forward_pre_hook(self._before_call),
            model.register_forward_hook(self._after_call),
        ]

    # ------------------------------------------------------------------ hooks

    def _before_call(self, module, args):
        self.refresh = refresh_schedule(
            self.step, self.interval, self.warmup_steps, self.num_steps, self.refresh_last
        )
        self.refreshed.append(self.refresh)
        self._called = set()

    def _after_call(self, module, args, output):
        missing = [p for p in self.site_paths if p not in self._called]
        if missing:
            raise RuntimeError(f"FORA sites were not called during the forward: {missing}")
        self.step += 1
        if self.num_steps is not None and self.step >= self.num_steps:
            self.step = 0

    def _make_forward(self, path: str, original_forward):
        def forward(*args, **kwargs):
            if path in self._called:
                raise RuntimeError(f"FORA site {path!r} called twice in one model call")
            self._called.add(path)
            if self.refresh:
                out = original_forward(*args, **kwargs)
                self._store(path, out)
                return out
            if path not in self.cache:
                raise RuntimeError(f"FORA site {path!r} reused before it was ever computed")
            return self._replay(path)

        return forward

    def _store(self, path: str, out) -> None:
        self.cache[path] = _clone(out)

    def _replay(self, path: str):
        return _clone(self.cache[path])

    # ------------------------------------------------------------------ API

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def reset(self) -> None:
        """The next call is step 0; cached outputs and the ``refreshed`` log are dropped."""
        self.step = 0
        self.refresh = True
        self.cache.clear()
        self.refreshed.clear()
        self._called = set()

    def remove(self) -> None:
        """Restore the original site forwards and remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for path, module in self._sites.items():
            if path in self._had_instance_forward:
                module.forward = self._had_instance_forward[path]
            else:
                del module.forward
        self._sites = {}
        self.cache.clear()


class EagerTaylor(EagerFora):
    """TaylorSeer's forecast (arXiv 2503.06923) on the same schedule, with host-side step
    arithmetic: the cache of a site is (step of its last full computation, [F_0 .. F_k]) per
    output; F_{j+1} = (F_j - F_j^prev) / gap while a previous F_j exists. A reuse `d` steps
    after the last full step returns sum_j F_j * d**j / j! (in float64, cast back)."""

    def __init__(self, model: nn.Module, site_paths: list[str], interval: int, order: int,
                 full_steps=None, **kwargs):
        self.order = order
        self.full_steps = None if full_steps is None else set(full_steps)
        super().__init__(model, site_paths, interval, **kwargs)

    def _before_call(self, module, args):
        super()._before_call(module, args)
        if self.step == 0:  # a new generation (also after num_steps wrapped): no factor kept
            self.cache.clear()
        if self.full_steps is not None:  # an explicit schedule instead of the interval rule
            self.refresh = self.refreshed[-1] = self.step in self.full_steps

    def _store(self, path: str, out) -> None:
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        last = self.cache.get(path)
        entries = []
        for i, y in enumerate(outs):
            factors = [y.double()]
            if last is not None:
                gap = self.step - last[0]
                for j, old in enumerate(last[1][i][: self.order]):
                    factors.append((factors[j] - old) / gap)
            entries.append(factors)
        self.cache[path] = (self.step, entries, [y.dtype for y in outs],
                            isinstance(out, torch.Tensor))

    def _replay(self, path: str):
        last, entries, dtypes, single = self.cache[path]
        d = self.step - last
        outs = tuple(sum(f * (d ** j / math.factorial(j)) for j, f in enumerate(fs)).to(dt)
                     for fs, dt in zip(entries, dtypes, strict=True))
        return outs[0] if single else outs
