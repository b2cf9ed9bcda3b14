"""Piecewise caching (ForaConfig(piecewise=Piecewise(...))): one model call that Dynamo
captured as several graphs, with hook sites between them.

`Runtime` decides the step once per model call and opens a `Piece`; each graph run and each
hook site's call asks it whether its cache may be reused: iff that cache was filled since the
branch's last scheduled refresh. One met for the first time, or with new inputs, recomputes.

Hook sites: HiDream-I1's mixture-of-experts feed-forward loops over `bincount()` of its
routing, so Dynamo breaks the graph inside it and the graphs around it hold no whole MLP to
cache. Named in `Piecewise.hook_sites`, such a module is taken out of Dynamo's reach
(`torch._dynamo.disable`) and cached the way the paper's hooks cache a module's output:
computed eagerly on refresh steps, returned on reuse steps. Its locator checks cannot run:
naming it asserts that its output is a residual branch. A reuse also needs the call's inputs
to match the refresh's (structure, shapes, dtypes, devices, Python values), as a graph would
be recompiled for new ones.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .fastpath import signature

# A graph's cache is keyed by (pair, the parameters it was called with, occurrence): Dynamo
# compiles a block's forward once and runs it for every block. A hook site's by (path,
# occurrence).
Key = tuple[Any, ...]


@dataclass
class PieceCaches:
    """One branch's piecewise caches: buffers per graph run, outputs per hook site call, and
    the scheduled refresh (`period`) each was last filled in."""

    period: int = 0
    buffers: dict[Key, list[torch.Tensor]] = field(default_factory=dict)
    outputs: dict[Key, tuple[Any, tuple[int, ...], Any]] = field(default_factory=dict)
    filled: dict[Key, int] = field(default_factory=dict)

    def tensors(self) -> list[Any]:
        return [list(self.buffers.values()), [out for out, *_ in self.outputs.values()]]


@dataclass
class Piece:
    """A piecewise model call under way."""

    caches: PieceCaches
    refresh: bool  # the schedule's decision for this call
    refreshed: bool = False  # whether something recomputed
    seen: dict[Any, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.caches.period += self.refresh

    def _key(self, what: Any) -> Key:
        n = self.seen.get(what, 0)
        self.seen[what] = n + 1
        return (*what, n)

    def _fresh(self, key: Key) -> bool:
        return self.caches.filled.get(key) == self.caches.period

    def _filled(self, key: Key) -> None:
        self.caches.filled[key] = self.caches.period
        self.refreshed = True

    def run(self, pair: Any, args: Sequence[Any],
            stack_inputs: Callable[[Any, str, Sequence[Any], Any], list]) -> Any:
        key = self._key((pair, tuple(id(a) for a in args if isinstance(a, torch.nn.Parameter))))
        buffers = self.caches.buffers.get(key)
        if buffers is None:
            buffers = self.caches.buffers[key] = [s.allocate() for s in pair.specs]
        if self._fresh(key):
            return pair.reuse(*args, *buffers, *stack_inputs(pair, "reuse", args, key))
        if self.caches.filled.pop(key, None) != self.caches.period - 1:
            pair.start_cold(buffers)  # not filled at the previous full step
        out = pair.refresh(*args, *buffers, *stack_inputs(pair, "refresh", args, key))
        self._filled(key)
        return out

    def run_module(self, path: str, inputs: Any, call: Callable[[], Any]) -> Any:
        """A hook site's call; `inputs` describes its arguments (None: not describable)."""
        key = self._key((path,))
        stored = self.caches.outputs.get(key)
        if self._fresh(key) and stored is not None and inputs is not None \
                and stored[2] == inputs:
            out, versions, _ = stored
            if _versions(out) != versions:
                raise RuntimeError(
                    f"fora_fx: the cached output of hook site {path} was modified in place "
                    "after it was returned (the model writes into that module's output), so "
                    "it cannot be reused. Remove it from Piecewise.hook_sites.")
            return out
        self.caches.filled.pop(key, None)
        out = call()
        self.caches.outputs[key] = (out, _versions(out), inputs)
        self._filled(key)
        return out


def _versions(out: Any) -> tuple[int, ...]:
    return tuple(t._version for t in tree_leaves(out) if isinstance(t, torch.Tensor))


def resolve(model: torch.nn.Module, patterns: Sequence[str]) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) for every module a pattern names; a module inside a named one is not
    named again. Each pattern must name some module."""
    named = [(p, m) for p, m in model.named_modules() if p]
    found: dict[str, torch.nn.Module] = {}
    for pattern in patterns:
        hits = [(p, m) for p, m in named if fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in named})
            raise ValueError(
                f"Piecewise.hook_sites: {pattern!r} names no module of "
                f"{type(model).__name__} (module paths such as {named[0][0]!r}; last path "
                f"components: {', '.join(leaves[:40])})")
        found.update(hits)
    return [(p, m) for p, m in found.items() if not any(p.startswith(q + ".") for q in found)]


def install(hooked: list[tuple[str, torch.nn.Module]],
            run_module: Callable[[str, Any, Callable[[], Any]], Any]) -> Callable[[], None]:
    """Routes each module's calls through `run_module`, outside Dynamo; returns the undo."""
    for path, module in hooked:
        if "forward" in module.__dict__:
            raise ValueError(
                f"Piecewise.hook_sites: {path} ({type(module).__name__}) already has an "
                "instance-level forward (another hook or wrapper); fora_fx would replace it")
        module.forward = torch._dynamo.disable(
            _routed(path, module.forward, run_module), reason=f"fora_fx hook site {path}")
    return lambda: remove(hooked)


def _routed(path: str, inner: Callable[..., Any], run_module: Callable[..., Any]) -> Any:
    warned = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal warned
        inputs = signature(args, kwargs)
        if inputs is None and not warned:
            warned = True
            warnings.warn(
                f"fora_fx: hook site {path} is called with arguments other than tensors, "
                "numbers, strings, None and containers of them; fora_fx cannot tell whether "
                "they changed, so it recomputes the module on every step", stacklevel=2)
        return run_module(path, inputs, lambda: inner(*args, **kwargs))

    return forward


def remove(hooked: list[tuple[str, torch.nn.Module]]) -> None:
    for _, module in hooked:
        module.__dict__.pop("forward", None)
