"""Drop-in for unmodified diffusers pipelines: `fora_fx.transform(pipe, interval=3)`.

The pipeline's transformer (and `transformer_2`, ..., Wan 2.2's second expert) is replaced by
a ForaModule whose step position comes from the pipeline's scheduler (fora_fx/steps.py);
`fora_fx.restore(pipe)` puts the originals back.
Nothing of diffusers is imported: a pipeline is anything with a `transformer` module and a
`scheduler`.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ForaConfig
from .steps import PipelineSteps


def is_pipeline(obj: Any) -> bool:
    return not isinstance(obj, torch.nn.Module) and (
        hasattr(obj, "scheduler") or hasattr(obj, "components")
    )


def _components(pipe: Any) -> list[str]:
    comps = getattr(pipe, "components", None)
    return sorted(comps) if isinstance(comps, dict) else []


def transformer_names(pipe: Any) -> list[str]:
    """`transformer`, then `transformer_2`, ... where present: Wan 2.2's two experts (high-
    and low-noise steps) are `transformer` and `transformer_2`."""
    names = ["transformer"]
    while isinstance(getattr(pipe, f"transformer_{len(names) + 1}", None), torch.nn.Module):
        names.append(f"transformer_{len(names) + 1}")
    return names


def transform_pipeline(pipe: Any, config: ForaConfig, wrap: Any) -> Any:
    """Replaces `pipe.transformer` (and `transformer_2`, ...) by `wrap(transformer, config,
    source)`; returns `pipe`. Each transformer has its own caches; all follow the
    pipeline's steps (one `PipelineSteps`)."""
    model = getattr(pipe, "transformer", None)
    if model is None or not isinstance(model, torch.nn.Module):
        has_unet = isinstance(getattr(pipe, "unet", None), torch.nn.Module)
        raise TypeError(
            f"fora_fx.transform: {type(pipe).__name__} has no `transformer` module to cache"
            + (" (it has a UNet: FORA caches transformer blocks)" if has_unet else "")
            + f"; its components are {_components(pipe)}. Pass a pipeline with a transformer "
            "(DiT, PixArt, SD3, Flux, ...) or the model itself."
        )
    if type(model).__name__ == "ForaModule":
        raise TypeError("fora_fx.transform: this pipeline is already transformed")
    steps = PipelineSteps(pipe)
    for name in transformer_names(pipe):
        fast = wrap(getattr(pipe, name), config, steps)
        # object.__setattr__ skips DiffusionPipeline.__setattr__, which would record the
        # wrapper's class in the pipeline config (save_pretrained must still name the model).
        object.__setattr__(pipe, name, fast)
    return pipe


def wrapped(pipe: Any) -> dict[str, Any]:
    """name -> the pipeline's transformed transformers (ForaModules), in transformer_names
    order."""
    found = {n: getattr(pipe, n, None) for n in transformer_names(pipe)}
    return {n: f for n, f in found.items() if getattr(f, "_fora", None) is not None}


def restore_pipeline(pipe: Any) -> Any:
    fasts = wrapped(pipe)
    if not fasts:
        raise TypeError(f"fora_fx.restore: {type(pipe).__name__} was not transformed")
    for name, fast in fasts.items():
        fast._fora.release()
        object.__setattr__(pipe, name, fast._fora.model)
    return pipe
