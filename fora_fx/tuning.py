"""Performance internals, with the defaults the benchmarks measured (docs/benchmarks.md).

Not part of ForaConfig: no setting here changes what a model computes, only how fast. Read
when a model is transformed (or compiled by name), so a change applies to models transformed
after it:

    with fora_fx.tuning.patch(batch_blocks=False):
        fast = fora_fx.transform(model)

batch_blocks:       run the blocks' conditioning (timestep / class embedders, adaLN Linears)
                    as one computation vmapped over blocks (passes/batch.py). Re-homes those
                    parameters into stacked tensors on the first call (fora_fx/stacks.py).
reuse_fusion_limit: the most distinct buffers one fused kernel of the reuse graph may read or
                    write (Inductor's max_fusion_unique_io_buffers, for that compile only);
                    None: Inductor's default. Keeps Inductor from fusing the whole cached
                    residual chain into the final norm's reduction.
fast_calls:         what a call that continues a generation and repeats the previous call's
                    input signature may skip (fora_fx/fastpath.py): "direct" (default) skips
                    Dynamo's guards and its frame, calling the compiled graphs straight;
                    "unguarded" skips only the guards; "off" guards every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .config import require_int

FAST_CALLS = ("direct", "unguarded", "off")


@dataclass(frozen=True)
class Tuning:
    batch_blocks: bool = True
    reuse_fusion_limit: int | None = 16
    fast_calls: str = "direct"

    def __post_init__(self) -> None:
        if not isinstance(self.batch_blocks, bool):
            raise TypeError(f"tuning.batch_blocks must be a bool, got {self.batch_blocks!r}")
        if self.reuse_fusion_limit is not None:
            require_int("tuning.reuse_fusion_limit", self.reuse_fusion_limit, 2)
        if self.fast_calls not in FAST_CALLS:
            raise ValueError(f"tuning.fast_calls must be one of {FAST_CALLS}, "
                             f"got {self.fast_calls!r}")

    @property
    def graph_key(self) -> tuple[Any, ...]:
        """The settings that change the compiled graphs (a backend per distinct value)."""
        return (self.batch_blocks, self.reuse_fusion_limit)


_current = Tuning()


def current() -> Tuning:
    return _current


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[Tuning]:
    """Changes tuning inside the `with` block (for models transformed inside it)."""
    global _current
    previous = _current
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous
