"""Modules cached around their call (ForaConfig.hook_sites), for forwards Dynamo cannot capture.

HiDream-I1's mixture-of-experts feed-forward loops over `bincount()` of its routing: Dynamo
breaks the graph inside it and compiles each expert's frame again for every token count it
meets, and the piecewise graphs around it hold no whole MLP to cache, so the feed-forward, the
bulk of each block, runs on every step. Named in `hook_sites`, such a module is taken out of
Dynamo's reach (`torch._dynamo.disable`) and cached the way the paper's hooks cache a module's
output: computed eagerly on refresh steps, returned from the cache on reuse steps, decided by
the same per-call step as the piecewise graphs around it (Runtime.run_module). The locator's
checks cannot see inside such a module: naming it asserts that its output is a residual
branch, as an attention's or MLP's output is. A reuse also needs the call's inputs to match
the refresh's in structure, shapes, dtypes, devices and Python values (fora_fx/guards.py), as
a graph would be recompiled for new ones; otherwise the module recomputes.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import guards
from .runtime import Runtime


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
                f"ForaConfig.hook_sites: {pattern!r} names no module of "
                f"{type(model).__name__} (module paths such as {named[0][0]!r}; last path "
                f"components: {', '.join(leaves[:40])})"
            )
        found.update(hits)
    return [(p, m) for p, m in found.items()
            if not any(p.startswith(q + ".") for q in found)]


def install(runtime: Runtime, hooked: list[tuple[str, torch.nn.Module]]) -> None:
    """Routes each module's calls through `runtime.run_module`, outside Dynamo, until the
    runtime is released (fora_fx.restore)."""
    for path, module in hooked:
        if "forward" in module.__dict__:
            raise ValueError(
                f"ForaConfig.hook_sites: {path} ({type(module).__name__}) already has an "
                "instance-level forward (another hook or wrapper); fora_fx would replace it"
            )
        module.forward = torch._dynamo.disable(
            _routed(runtime, path, module.forward), reason=f"fora_fx hook site {path}")
    runtime.hooked += [path for path, _ in hooked]
    runtime.on_release.append(lambda: remove(hooked))


def _routed(runtime: Runtime, path: str, inner: Callable[..., Any]) -> Callable[..., Any]:
    warned = False

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal warned
        inputs = guards.signature(args, kwargs)
        if inputs is None and not warned:
            warned = True
            warnings.warn(
                f"fora_fx: hook site {path} is called with arguments other than tensors, "
                "numbers, strings, None and containers of them; fora_fx cannot tell whether "
                "they changed, so it recomputes the module on every step", stacklevel=2)
        return runtime.run_module(path, inputs, lambda: inner(*args, **kwargs))

    return forward


def remove(hooked: list[tuple[str, torch.nn.Module]]) -> None:
    for _, module in hooked:
        module.__dict__.pop("forward", None)
