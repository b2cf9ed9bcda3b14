"""Compile stage: hand one rewritten variant to Inductor (or run it un-compiled)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from .config import ForaConfig


def inductor_patches(mode: str | None) -> dict[str, Any]:
    """Inductor config for a torch.compile mode, scoped to our compile calls (never global)."""
    if mode in (None, "default"):
        return {}
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def fusion_limit_patches(limit: int | None) -> dict[str, Any]:
    """Inductor config bounding the distinct buffers of one fused kernel (if this torch has
    the knob; it is a performance heuristic, so without it the compile goes on unbounded)."""
    import torch._inductor.config as inductor_config

    if limit is None or not hasattr(inductor_config, "max_fusion_unique_io_buffers"):
        return {}
    return {"max_fusion_unique_io_buffers": limit}


def compile_variant(
    gm: GraphModule,
    example_inputs: Sequence[torch.Tensor],
    config: ForaConfig,
    patches: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Returns a callable taking the variant's flat inputs (the graph's inputs + buffers).

    `patches`: extra Inductor config for this variant only (on top of the mode's)."""
    if config.compiler == "eager":
        return gm
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, list(example_inputs))
    from torch._inductor.compile_fx import compile_fx

    options = {**inductor_patches(config.mode), **(patches or {})}
    compiled = compile_fx(gm, list(example_inputs), config_patches=options)
    if not callable(compiled):  # compile_fx's annotation also covers AOT-export results
        raise TypeError(f"Inductor returned {type(compiled).__name__}, not a callable")
    return compiled
