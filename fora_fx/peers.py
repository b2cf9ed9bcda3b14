"""The methods fora_fx is measured against, as the peers ship them (eager Python hooks).

* `HookFora`: FORA as the official code does it — module forwards replaced by Python
  wrappers that compute-and-store or return the cached output, one decision per call.
* diffusers' TaylorSeer and Pyramid Attention Broadcast hooks, configured to the same refresh
  interval, when the installed diffusers has them.
Each wraps a model in place; `.start_generation()` resets its state between generations.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch


class HookFora:
    """Official-style FORA: Python wrappers on the site modules, one decision per call."""

    def __init__(self, model: torch.nn.Module, site_paths: list[str], interval: int):
        self.model, self.interval = model, interval
        self.step, self.refresh = 0, True
        self.cache: dict[str, Any] = {}
        self.modules = {p: model.get_submodule(p) for p in site_paths}
        for path, module in self.modules.items():
            module.forward = self._wrap(path, module.forward)
        model.register_forward_pre_hook(self._before)
        model.register_forward_hook(self._after)

    def _before(self, module: Any, args: Any) -> None:
        self.refresh = self.step % self.interval == 0 or not self.cache

    def _after(self, module: Any, args: Any, out: Any) -> None:
        self.step += 1

    def _wrap(self, path: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if self.refresh:
                self.cache[path] = forward(*args, **kwargs)
            return self.cache[path]

        return wrapped

    def start_generation(self) -> None:
        self.step, self.cache = 0, {}


class DiffusersHook:
    """diffusers' TaylorSeer or Pyramid Attention Broadcast hook at a refresh interval.

    TaylorSeer's default module patterns (`^transformer_blocks.*attn`, full match) miss DiT's
    `attn1` / `ff`, so it is pointed at the same modules FORA caches (`site_paths`). Its step
    counter is 1-based and it computes on steps < disable_cache_before_step and on
    (step - disable_cache_before_step - 1) % interval == 0: with 2, it computes steps 1, 3,
    3 + N, ... — as many full steps as FORA at the same N. PAB keeps its own defaults: it
    broadcasts attention only, for timesteps inside its skip range (set to all timesteps).
    """

    def __init__(self, model: torch.nn.Module, kind: str, interval: int,
                 timestep: Callable[[], int], site_paths: list[str] | None = None):
        from diffusers.hooks import HookRegistry

        self.model = model
        if kind == "taylorseer":
            from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

            apply_taylorseer_cache(model, TaylorSeerCacheConfig(
                cache_interval=interval, disable_cache_before_step=2,
                cache_identifiers=[re.escape(p) for p in site_paths] if site_paths else None,
                taylor_factors_dtype=next(model.parameters()).dtype))
        elif kind == "pab":
            from diffusers.hooks import (
                PyramidAttentionBroadcastConfig,
                apply_pyramid_attention_broadcast,
            )

            apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=interval,
                cross_attention_block_skip_range=interval,
                spatial_attention_timestep_skip_range=(-1, 10_000),
                cross_attention_timestep_skip_range=(-1, 10_000),
                current_timestep_callback=timestep))
        else:
            raise ValueError(f"unknown diffusers hook {kind!r}; valid: 'taylorseer', 'pab'")
        self.registry = HookRegistry.check_if_exists_or_initialize(model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # diffusers' stateful hooks keep state per named denoising call ("cond", "uncond");
        # batched CFG is one call. DiT / PixArt lack CacheMixin, whose method only records
        # the name for the hooks, so it is applied unbound.
        from diffusers.models.cache_utils import CacheMixin

        with CacheMixin.cache_context(self.model, "batched"):
            return self.model(*args, **kwargs)

    def start_generation(self) -> None:
        self.registry.reset_stateful_hooks()


class SiteCounter:
    """Counts how often the site modules really compute. Install before a peer's hooks:
    they wrap `module.forward`, so a skipped (cached / predicted) call never reaches it."""

    def __init__(self, model: torch.nn.Module, site_paths: list[str]):
        self.calls = 0
        self.sites = len(site_paths)
        for path in site_paths:
            module = model.get_submodule(path)
            module.forward = self._wrap(module.forward)

    def skipped(self, model_calls: int) -> float:
        """Fraction of the sites' computations skipped over `model_calls` forwards."""
        return 1 - self.calls / max(1, self.sites * model_calls)

    def _wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return forward(*args, **kwargs)

        return counted
