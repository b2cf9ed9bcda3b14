"""ForaConfig: what a user decides, in the paper's vocabulary; the schedule rule lives here.

Performance internals (batching, guard skipping, fusion limits) are not here: they are
fora_fx.tuning's, measured defaults a user never needs to touch.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from .schedule import Schedule

SITE_KINDS = ("attn", "cross_attn", "mlp", "parallel")
COMPILERS = ("inductor", "aot_eager", "eager")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FORECASTS = (None, "taylor")
MAX_ORDER = 4
# Options of the first release that are now fora_fx.tuning's or Piecewise's: named on use.
MOVED = {
    "batch_blocks": "fora_fx.tuning.patch(batch_blocks=...)",
    "skip_guards": "fora_fx.tuning.patch(fast_calls='off')",
    "direct_calls": "fora_fx.tuning.patch(fast_calls='unguarded')",
    "reuse_fusion_limit": "fora_fx.tuning.patch(reuse_fusion_limit=...)",
    "fullgraph": "piecewise=fora_fx.Piecewise() (fullgraph=False)",
    "hook_sites": "piecewise=fora_fx.Piecewise(hook_sites=...)",
}


def require_int(owner: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `interval=True` is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner} must be an int >= {minimum}, got {value}")


def _patterns(name: str, value: object, example: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (tuple, list)) or not all(
        isinstance(p, str) and p for p in patterns
    ):
        raise TypeError(
            f"{name} must be a tuple of module-path patterns such as {example}, got {value!r}"
        )
    return tuple(patterns)


@dataclass(frozen=True)
class Piecewise:
    """Caching a model Dynamo cannot capture as one graph (`ForaConfig(piecewise=...)`).

    Each graph Dynamo captures has its sites cached, the code between graphs runs eagerly on
    every call, and the step is decided once per model call. Slower per step than one graph
    (Python between graphs, no single CUDA graph). Through `fora_fx.transform` only.

    hook_sites: module-path patterns (fnmatch: "*.ff_i") of modules cached around their call
                instead of inside a graph: computed eagerly on refresh steps, their output
                returned on reuse steps, as the paper's hooks do. For modules whose forward
                Dynamo cannot capture (HiDream-I1's mixture of experts). The locator cannot
                see inside them: naming one asserts its output is a residual branch.
    """

    hook_sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "hook_sites", _patterns("Piecewise.hook_sites",
                                                         self.hook_sites, "('*.ff_i',)"))


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
                   them with the pattern.
    compiler:      "inductor" (default), "aot_eager" or "eager" (runs the rewritten graphs
                   without compiling; for debugging and fast tests).
    mode:          torch.compile mode for Inductor; "reduce-overhead" turns on CUDA graphs.
    piecewise:     None: the forward must be one graph (a graph break raises, naming
                   Dynamo's reason). `Piecewise(...)`: cache what Dynamo captures around its
                   graph breaks (see Piecewise).
    forecast:      what a reuse step returns for a cached site. None: the output of the last
                   full step, unchanged (FORA). "taylor": a Taylor forecast from the last
                   full steps (TaylorSeer, arXiv 2503.06923): each full step stores the
                   output and its divided differences up to `order`; a reuse step `d`
                   steps after the last full one returns sum_j factor_j * d**j / j!,
                   evaluated inside the compiled reuse graph (passes/forecast.py).
    order:         the Taylor order, 1 .. 4; each order adds a cache buffer per cached output
                   (`explain` shows the bytes). Only with forecast="taylor".
    schedule:      None: the interval rule above. `Schedule({20: (0, 1, 4, 9, 15, 19)})`: the
                   full steps listed per generation length (`fora_fx.calibrate` measures
                   one); interval / warmup_steps / refresh_last then do not apply and are
                   refused if set. The generation length is the pipeline scheduler's, or
                   num_steps for a model; a length the schedule lacks raises at that
                   generation's first call.
    """

    interval: int = 3
    warmup_steps: int = 1
    num_steps: int | None = None
    refresh_last: bool = True
    sites: tuple[str, ...] = SITE_KINDS
    exclude: tuple[str, ...] = ()
    compiler: str = "inductor"
    mode: str | None = None
    piecewise: Piecewise | None = None
    forecast: str | None = None
    order: int = 1
    schedule: Schedule | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> ForaConfig:
        check_options(kwargs, cls)  # a moved option's error names its new home
        return super().__new__(cls)

    def __post_init__(self) -> None:
        require_int("ForaConfig.interval", self.interval, 1)
        require_int("ForaConfig.warmup_steps", self.warmup_steps, 1)
        if self.num_steps is not None:
            require_int("ForaConfig.num_steps", self.num_steps, 1)
        if not isinstance(self.refresh_last, bool):
            raise TypeError(f"ForaConfig.refresh_last must be a bool, got {self.refresh_last!r}")
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        if not sites or any(s not in SITE_KINDS for s in sites):
            raise ValueError(
                f"ForaConfig.sites must be a non-empty subset of {SITE_KINDS}, got {self.sites!r}"
            )
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "exclude", _patterns("ForaConfig.exclude", self.exclude,
                                                      "('context_embedder.*',)"))
        if self.compiler not in COMPILERS:
            raise ValueError(
                f"ForaConfig.compiler must be one of {COMPILERS}, got {self.compiler!r}"
            )
        if self.mode not in MODES:
            raise ValueError(f"ForaConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode is not None and self.compiler != "inductor":
            raise ValueError(
                f"ForaConfig.mode={self.mode!r} is an Inductor mode; it needs "
                f"compiler='inductor', not {self.compiler!r}"
            )
        if not (self.piecewise is None or isinstance(self.piecewise, Piecewise)):
            raise TypeError(
                f"ForaConfig.piecewise must be None or fora_fx.Piecewise(...), got "
                f"{self.piecewise!r}"
            )
        self._check_forecast()
        self._check_schedule()

    def _check_forecast(self) -> None:
        if self.forecast not in FORECASTS:
            raise ValueError(
                f"ForaConfig.forecast must be one of {FORECASTS} (None replays the last full "
                f"step's output, as FORA does), got {self.forecast!r}")
        require_int("ForaConfig.order", self.order, 1)
        if self.order > MAX_ORDER:
            raise ValueError(f"ForaConfig.order must be 1 .. {MAX_ORDER}, got {self.order}")
        if self.forecast is None and self.order != 1:
            raise ValueError(
                f"ForaConfig.order={self.order} is a Taylor order; it needs "
                "forecast='taylor' (without a forecast a reuse step replays the cache)")
        if self.forecast is not None and self.piecewise is not None \
                and self.piecewise.hook_sites:
            raise ValueError(
                "ForaConfig.forecast applies to sites inside the compiled graphs; hook sites "
                "(Piecewise.hook_sites) replay their output. Drop the hook sites, or "
                "forecast=None")

    @property
    def taylor_order(self) -> int:
        """How many Taylor factors beyond the output each cached output keeps (0: replay)."""
        return self.order if self.forecast == "taylor" else 0

    def _check_schedule(self) -> None:
        if self.schedule is None:
            return
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"ForaConfig.schedule must be None or fora_fx.Schedule({{length: "
                            f"full steps}}), got {self.schedule!r}")
        # A schedule lists every full step: the interval rule's options cannot apply beside
        # it. Set to a non-default value, they are refused by name rather than ignored (the
        # defaults cannot be told from unset ones, and they mean nothing with a schedule).
        ignored = [f"{name}={getattr(self, name)!r}"
                   for name in ("interval", "warmup_steps", "refresh_last")
                   if getattr(self, name) != _DEFAULTS[name]]
        if ignored:
            raise ValueError(
                f"ForaConfig: {', '.join(ignored)} cannot apply with a schedule, which lists "
                "every full step (step 0 included); drop them, or put the steps in the "
                "Schedule")
        if self.num_steps is not None and self.num_steps not in self.schedule.full:
            raise ValueError(
                f"ForaConfig.num_steps={self.num_steps}, but the schedule has full steps for "
                f"generations of {', '.join(map(str, self.schedule.full))} steps only")

    def refreshes(self, step: int, num_steps: int | None = None) -> bool:
        """True iff step `step` (0-based, within a generation) recomputes every site.

        `num_steps` overrides the configured one (a pipeline's scheduler knows it per call).
        With a schedule, the steps it lists for that generation length (a length it lacks, or
        none known, raises: no silent fallback to the interval rule).
        """
        if self.schedule is not None:
            n = self.num_steps if num_steps is None else num_steps
            return step in self.schedule.full_set(n)
        if step < self.warmup_steps or step % self.interval == 0:
            return True
        n = self.num_steps if num_steps is None else num_steps
        return n is not None and self.refresh_last and step == n - 1

    @property
    def graphs(self) -> ForaConfig:
        """This config with the step schedule at its defaults: the fields that shape the
        compiled graphs. Which steps refresh is the runtime's choice, read each call; the
        refresh and reuse graphs are the same for every schedule, so transformed models that
        differ only in it share one backend, and Dynamo's and Inductor's work with it (a
        sweep over N captures and compiles once)."""
        defaults: dict[str, Any] = {name: _DEFAULTS[name] for name in SCHEDULE_FIELDS}
        return dataclasses.replace(self, **defaults)

    def excluded_by(self, module_path: str) -> str | None:
        """The first `exclude` pattern matching `module_path`, or None."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(module_path, p)), None)

    def replace(self, **changes: Any) -> ForaConfig:
        return dataclasses.replace(self, **changes)  # __new__ checks the names

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, mode: str | None = None) -> ForaConfig:
        """Builds a config from torch.compile's `options=` dict (or `mode=`)."""
        options = dict(options or {})  # __new__ checks the names
        if mode is not None:
            options.setdefault("mode", mode)
        return cls(**options)


SCHEDULE_FIELDS = ("interval", "warmup_steps", "num_steps", "refresh_last", "schedule")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ForaConfig)}


def check_options(options: dict[str, Any], cls: type = ForaConfig) -> dict[str, Any]:
    """Refuses unknown option names, saying where a moved one lives now."""
    known = {f.name for f in dataclasses.fields(cls)}
    for name in options:
        if name in MOVED:
            raise TypeError(f"ForaConfig has no option {name!r}; use {MOVED[name]}")
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown fora option(s) {unknown}; valid options are {sorted(known)}")
    return options
