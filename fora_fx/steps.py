"""Where a call's step index comes from: a pipeline's scheduler, or counting calls.

Read on the host at every call, never from a device tensor: reading a timestep's value would
be a device->host sync per step.
"""

from __future__ import annotations

import weakref
from typing import Any


class PipelineSteps:
    """Step position of a diffusers pipeline, read from `pipe.scheduler` at each call.

    * generation: `scheduler.set_timesteps` builds a new `timesteps` tensor at the start of
      every pipeline call, so a different tensor object means a new generation (also after
      a call that raised mid-way). The tensor is compared by identity, never read.
    * step: `scheduler.step_index` (a host int; None before the first `step()` of a call,
      i.e. step `begin_index` or 0). Schedulers without one (DDIM) leave it to counting.
    * num_steps: `len(scheduler.timesteps)`, so the last step recomputes (`refresh_last`).

    The scheduler is looked up on the pipeline each time: replacing `pipe.scheduler` after
    transforming is fine.

    Counted steps are the pipeline's too: one `PipelineSteps` serves all of a pipeline's
    transformers, and `counted` / `advance` keep each branch's calls in this generation over
    all of them. Wan 2.2's second expert, first called at step 4, is at step 4 with a
    scheduler that has no step_index as with one that has.
    """

    def __init__(self, pipe: Any):
        self._pipe = weakref.ref(pipe)
        self._calls: dict[str, int] = {}  # branch name -> calls in the counted generation
        self._counted: object = None  # the generation (`timesteps` tensor) they belong to

    @property
    def pipe(self) -> Any:
        return self._pipe()

    def position(self) -> tuple[object, int | None, int | None]:
        pipe = self._pipe()
        scheduler = getattr(pipe, "scheduler", None) if pipe is not None else None
        if scheduler is None:
            return None, None, None
        timesteps = getattr(scheduler, "timesteps", None)
        num_steps = len(timesteps) if timesteps is not None else None
        step: int | None = None
        if hasattr(type(scheduler), "step_index"):
            step = scheduler.step_index
            if step is None:
                step = getattr(scheduler, "begin_index", None) or 0
        return timesteps, step, num_steps

    def counted(self, token: object, branch: str) -> int:
        """The step of `branch`'s next call in generation `token` (the `timesteps` tensor
        position() returned), counted over every transformer of the pipeline."""
        if token is not self._counted:
            self._calls, self._counted = {}, token
        return self._calls.get(branch, 0)

    def advance(self, branch: str) -> None:
        self._calls[branch] = self._calls.get(branch, 0) + 1

    def restart(self) -> None:
        """fora_fx.reset: the next call of every branch is step 0."""
        self._calls = {}
