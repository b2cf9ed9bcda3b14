"""cache-dit (PyPI `cache-dit`, tested with 1.5.3) as an optional peer method on the digits DiT.

cache-dit's DBCache splits the block list into Fn (always computed), Mn (cached) and Bn (always
computed) blocks and caches the Mn residual. To compare it with FORA at interval N on the same
budget, its *static* step mask is used instead of the residual-difference threshold: step i is
fully computed iff i % N == 0 (FORA's schedule, no forced last step), every other step reuses
the cached Mn residual -- or, with the TaylorSeer calibrator, a first-order extrapolation of it.

Why some settings are pinned:

* Fn_compute_blocks=1: cache-dit asserts Fn >= 1 (`CachedContextManager.Fn_compute_blocks`), so
  block 0 runs on every step; a cached step skips 4 of the 5 blocks, not 5 like FORA.
* enable_separate_cfg=False: the sampler batches cond and uncond into one call, so one model call
  is one denoising step and the mask is indexed per call.
* start_generation() calls `cache_dit.refresh_context`: cache-dit's own refresh on
  num_inference_steps fires one call late (it tests the *previous* step index before advancing),
  and past the end of the mask the static policy caches, so without it the next generation's
  first step would reuse the previous generation's residual and its mask would be shifted by one.

cache_dit is imported lazily: this module imports cleanly when it is not installed.
"""

from __future__ import annotations

from typing import Any

import torch


def available() -> bool:
    """True when cache_dit can be imported (it is an optional dependency)."""
    try:
        import cache_dit  # noqa: F401
    except Exception:  # ImportError, or a broken install failing at import time
        return False
    return True


def static_mask(n: int, num_steps: int) -> list[int]:
    """cache-dit's steps_computation_mask for FORA interval n: 1 = compute, 0 = cached.
    Built with `cache_dit.steps_mask` from compute/cache bins [1, n-1, 1, n-1, ...]; with explicit
    bins it does not force the last step to compute (only its named policies do)."""
    import cache_dit

    if n < 1 or num_steps < 1:
        raise ValueError(f"need n >= 1 and num_steps >= 1, got n={n}, num_steps={num_steps}")
    k = -(-num_steps // n)  # ceil: enough bins to cover every step
    return list(cache_dit.steps_mask(compute_bins=[1] * k, cache_bins=[n - 1] * k,
                                     total_steps=num_steps))


class CacheDitPeer:
    """A DiT with cache-dit's DBCache (static mask, optional TaylorSeer) applied in place.

    Callable like the model; counts real block forwards with pre-hooks installed on the blocks
    themselves, so a block that cache-dit skips is never counted. (Not peers.SiteCounter: it
    wraps `forward`, and cache-dit's forward-pattern check reads the blocks' signatures.)
    """

    def __init__(self, model: torch.nn.Module, n: int, num_steps: int,
                 calibrator: str | None = None):
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
        from cache_dit.caching.patch_functors import DiTPatchFunctor

        if calibrator not in (None, "taylorseer"):
            raise ValueError(f"unknown calibrator {calibrator!r}; valid: 'taylorseer', None")
        self.model, self.num_steps = model, num_steps
        self.blocks = len(model.transformer_blocks)  # type: ignore[arg-type]
        self.mask = static_mask(n, num_steps)
        self.calls = 0  # model calls (denoising steps, CFG batched)
        self.computed = 0  # block forwards that really ran
        for block in model.transformer_blocks:  # type: ignore[union-attr]
            block.register_forward_pre_hook(self._count)
        cache_config = DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0,
            max_warmup_steps=0,  # the mask decides; warm-up would be capped by it anyway
            num_inference_steps=num_steps, enable_separate_cfg=False,
            steps_computation_mask=self.mask, steps_computation_policy="static",
        )
        calibrator_config = None
        if calibrator == "taylorseer":
            from cache_dit import TaylorSeerCalibratorConfig

            calibrator_config = TaylorSeerCalibratorConfig(
                enable_calibrator=True, enable_encoder_calibrator=False,  # DiT has no encoder
                taylorseer_order=1)
        # DiT's own forward indexes `transformer_blocks[0].norm1.emb` after the loop, which
        # cache-dit's one-element wrapper list breaks; DiTPatchFunctor rewrites the forward.
        adapter = BlockAdapter(
            transformer=model, blocks=model.transformer_blocks,
            forward_pattern=ForwardPattern.Pattern_3,  # hidden_states in, hidden_states out
            patch_functor=DiTPatchFunctor(), check_forward_pattern=True)
        cache_dit.enable_cache(adapter, cache_config=cache_config,
                               calibrator_config=calibrator_config)

    def _count(self, module: torch.nn.Module, args: Any) -> None:
        self.computed += 1

    def start_generation(self) -> None:
        """Drop cached residuals, calibrator state and step counters before a sampling loop."""
        import cache_dit

        cache_dit.refresh_context(self.model)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(*args, **kwargs)

    def skipped(self) -> float:
        """Measured fraction of transformer-block forwards skipped over all calls so far."""
        return 1 - self.computed / max(1, self.blocks * self.calls)

    def expected_skipped(self) -> float:
        """The fraction the static mask implies: every cached step skips all but block 0."""
        cached = self.mask.count(0)
        return cached * (self.blocks - 1) / (self.blocks * self.num_steps)
