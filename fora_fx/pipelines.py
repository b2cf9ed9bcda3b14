"""Drop-in for unmodified diffusers pipelines: `fora_fx.transform(pipe, interval=3)`.

The pipeline's transformer is replaced by a ForaModule whose step position comes from the
pipeline's scheduler (fora_fx/steps.py); `fora_fx.restore(pipe)` puts the original back.
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


def transform_pipeline(pipe: Any, config: ForaConfig, wrap: Any) -> Any:
    """Replaces `pipe.transformer` by `wrap(transformer, config, source)`; returns `pipe`."""
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
    fast = wrap(model, config, PipelineSteps(pipe))
    # object.__setattr__ skips DiffusionPipeline.__setattr__, which would record the
    # wrapper's class in the pipeline config (save_pretrained must still name the model).
    object.__setattr__(pipe, "transformer", fast)
    return pipe


def restore_pipeline(pipe: Any) -> Any:
    fast = getattr(pipe, "transformer", None)
    original = getattr(fast, "_fora_model", None)
    if fast is None or original is None:
        raise TypeError(f"fora_fx.restore: {type(pipe).__name__} was not transformed")
    fast._fora_runtime.release()
    object.__setattr__(pipe, "transformer", original)
    return pipe
