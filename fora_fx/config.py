"""ForaConfig: the one object that says what FORA does, in the paper's vocabulary.

The schedule rule lives here and nowhere else (`ForaConfig.refreshes`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

SITE_KINDS = ("attn", "cross_attn", "mlp", "parallel")
COMPILERS = ("inductor", "aot_eager", "eager")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _require_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `interval=True` is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ForaConfig.{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"ForaConfig.{name} must be an int >= {minimum}, got {value}")


def _patterns(name: str, value: object, example: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (tuple, list)) or not all(
        isinstance(p, str) and p for p in patterns
    ):
        raise TypeError(
            f"ForaConfig.{name} must be a tuple of module-path patterns such as {example}, "
            f"got {value!r}"
        )
    return tuple(patterns)


@dataclass(frozen=True)
class ForaConfig:
    """What to cache and when.

    interval:      FORA's N. Step k recomputes iff k < warmup_steps, or k % interval == 0, or
                   (num_steps is set, refresh_last, and k == num_steps - 1). 1 never reuses.
    warmup_steps:  the first steps of a generation always recompute (>= 1: step 0 has no cache).
    num_steps:     steps per generation, if known. The step counter wraps to 0 after this many
                   calls, so consecutive generations need no explicit `fora_fx.reset`.
    refresh_last:  with num_steps known, the final step recomputes (the official code does).
    sites:         which kinds of site to cache: any of "attn", "cross_attn", "mlp",
                   "parallel" (a parallel block's fused attention + MLP output, Flux).
    exclude:       module-path patterns (fnmatch: "context_embedder.*",
                   "transformer_blocks.0.*") whose sites are not cached; `explain` lists
                   them with the pattern. For sites outside the DiT blocks the paper caches
                   (HunyuanVideo's token refiner) or blocks kept exact.
    hook_sites:    module-path patterns (fnmatch: "*.ff_i") of modules cached around their
                   call instead of inside a graph: computed eagerly on refresh steps, their
                   output returned on reuse steps, as the paper's hooks do. For modules whose
                   forward Dynamo cannot capture (HiDream-I1's mixture of experts); needs
                   fullgraph=False. The locator's checks cannot see inside them: naming one
                   asserts its output is a residual branch (fora_fx/hooks.py).
    compiler:      "inductor" (default), "aot_eager" or "eager" (runs the rewritten graphs
                   without compiling; for debugging and fast tests).
    mode:          torch.compile mode for Inductor; "reduce-overhead" turns on CUDA graphs.
    batch_blocks:  run the blocks' conditioning (timestep / class embedders, adaLN Linears)
                   as one computation vmapped over blocks (passes/batch.py): a few kernels
                   instead of a few per block. Re-homes those parameters into stacked
                   tensors on the first call (fora_fx/stacks.py); False leaves them alone.
    skip_guards:   a ForaModule call that continues a generation with inputs of the same
                   structure, shapes, dtypes and devices as the previous call (same model
                   mode, autocast state and parameter storage) runs with Dynamo's guard
                   evaluation skipped (torch.compiler.set_stance(skip_guard_eval_unsafe)):
                   guards cost more host time than a reuse step takes on a GPU. The first
                   call of every generation, and any call that differs, is fully guarded.
    direct_calls:  such a call also skips Dynamo's frame, which fetches every parameter
                   through its module path on each call: it goes straight to the compiled
                   graphs with the inputs recorded at the generation's first call
                   (fora_fx/direct.py). Declined, per graph, where the frame does more
                   (a Python side effect). Takes effect only with skip_guards.
    fullgraph:     True: the model's forward must be one graph, and a graph break raises
                   (naming the model and Dynamo's reason). False (through `transform`
                   only): a model whose own code Dynamo cannot capture in one graph is
                   cached piecewise: each graph Dynamo captures has its sites cached, the
                   code between graphs runs eagerly every call, and the step is decided
                   once per model call. Slower per step than one graph (Python between
                   graphs, no single CUDA graph); skip_guards and direct_calls do not apply.
    reuse_fusion_limit: the most distinct buffers one fused kernel of the reuse graph may
                   read or write (Inductor's max_fusion_unique_io_buffers, for that compile
                   only). Keeps Inductor from fusing the whole cached residual chain into
                   the final norm's reduction (on an H100, DiT-XL/2 at B=16: a 4.8 ms kernel
                   against a 0.2 ms memory floor; docs/how-it-works.md). None: Inductor's
                   default, no limit.
    """

    interval: int = 3
    warmup_steps: int = 1
    num_steps: int | None = None
    refresh_last: bool = True
    sites: tuple[str, ...] = SITE_KINDS
    exclude: tuple[str, ...] = ()
    hook_sites: tuple[str, ...] = ()
    compiler: str = "inductor"
    mode: str | None = None
    batch_blocks: bool = True
    skip_guards: bool = True
    direct_calls: bool = True
    fullgraph: bool = True
    reuse_fusion_limit: int | None = 16

    def __post_init__(self) -> None:
        _require_int("interval", self.interval, 1)
        _require_int("warmup_steps", self.warmup_steps, 1)
        if self.num_steps is not None:
            _require_int("num_steps", self.num_steps, 1)
        if not isinstance(self.refresh_last, bool):
            raise TypeError(f"ForaConfig.refresh_last must be a bool, got {self.refresh_last!r}")
        sites = self.sites
        if isinstance(sites, str):
            sites = (sites,)
        sites = tuple(sites)
        unknown = [s for s in sites if s not in SITE_KINDS]
        if unknown or not sites:
            raise ValueError(
                f"ForaConfig.sites must be a non-empty subset of {SITE_KINDS}, got {self.sites!r}"
            )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude,
                                                      "('context_embedder.*',)"))
        object.__setattr__(self, "hook_sites", _patterns("hook_sites", self.hook_sites,
                                                         "('*.ff_i',)"))
        if self.compiler not in COMPILERS:
            raise ValueError(
                f"ForaConfig.compiler must be one of {COMPILERS}, got {self.compiler!r}"
            )
        if not isinstance(self.batch_blocks, bool):
            raise TypeError(f"ForaConfig.batch_blocks must be a bool, got {self.batch_blocks!r}")
        if not isinstance(self.skip_guards, bool):
            raise TypeError(f"ForaConfig.skip_guards must be a bool, got {self.skip_guards!r}")
        if not isinstance(self.direct_calls, bool):
            raise TypeError(f"ForaConfig.direct_calls must be a bool, got {self.direct_calls!r}")
        if not isinstance(self.fullgraph, bool):
            raise TypeError(f"ForaConfig.fullgraph must be a bool, got {self.fullgraph!r}")
        if self.reuse_fusion_limit is not None:
            _require_int("reuse_fusion_limit", self.reuse_fusion_limit, 2)
        if self.mode not in MODES:
            raise ValueError(f"ForaConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.hook_sites and self.fullgraph:
            raise ValueError(
                "ForaConfig.hook_sites runs the named modules outside Dynamo's graphs, which "
                "splits the forward: it needs fullgraph=False"
            )

    def refreshes(self, step: int, num_steps: int | None = None) -> bool:
        """True iff step `step` (0-based, within a generation) recomputes every site.

        `num_steps` overrides the configured one (a pipeline's scheduler knows it per call).
        """
        if step < self.warmup_steps or step % self.interval == 0:
            return True
        n = self.num_steps if num_steps is None else num_steps
        return n is not None and self.refresh_last and step == n - 1

    def excluded_by(self, module_path: str) -> str | None:
        """The first `exclude` pattern matching `module_path`, or None."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(module_path, p)), None)

    def replace(self, **changes: Any) -> ForaConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, mode: str | None = None) -> ForaConfig:
        """Builds a config from torch.compile's `options=` dict (or `mode=`)."""
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown fora option(s) {unknown}; valid options are {sorted(known)}"
            )
        if mode is not None:
            options.setdefault("mode", mode)
        return cls(**options)
