"""When a ForaModule call may skip Dynamo's guard evaluation (ForaConfig.skip_guards).

Dynamo checks its guards on every call: for a 28-block DiT about 0.5 ms of host time on the
dev CPU (docs/benchmarks.md), while a reuse step on a GPU is a fraction of a millisecond of
device time, so a guarded reuse step is host-bound. PyTorch's answer is
`torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)`: run only the guards that
tell compiled entries apart, for callers that know no recompile is due. This module decides
when that is known: the call continues a generation whose earlier calls were guarded, and it
repeats the previous call's
  * argument structure, and every tensor's shape, strides, dtype and device (a new shape or
    dtype must recompile: that call is guarded and compiles as usual);
  * non-tensor argument values (Dynamo specializes on them);
  * model mode (train / eval), autocast state, and the storage, dtype and device of the
    model's first parameter and of the last one it had on its first call (`model.to(...)`
    moves both; loading new parameter objects replaces the first).
What it does not see is a change to the model's Python attributes in the middle of a
generation (swapping an attention processor between two steps); FORA's caches would be stale
then anyway. Calls that start a generation always run the full guards.
"""

from __future__ import annotations

from typing import Any

import torch

_SCALARS = (bool, int, float, str, type(None))


def signature(args: tuple, kwargs: dict[str, Any]) -> tuple | None:
    """A hashable description of the call's inputs, or None if some input is not plain
    (then the call is simply guarded)."""
    try:
        return (_describe(args), _describe(dict(kwargs)))
    except _Opaque:
        return None


class _Opaque(Exception):
    pass


def _describe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.device, x.requires_grad)
    if isinstance(x, _SCALARS):
        return (type(x), x)
    if isinstance(x, (tuple, list)):
        return (type(x), tuple(_describe(v) for v in x))
    if isinstance(x, dict):
        items = sorted(x.items(), key=lambda kv: str(kv[0]))
        return (dict, tuple((k, _describe(v)) for k, v in items))
    raise _Opaque


def model_state(model: torch.nn.Module, last_param: torch.Tensor | None) -> tuple:
    first = next(model.parameters(), None)
    params = tuple(
        (p.data_ptr(), p.dtype, p.device) for p in (first, last_param) if p is not None
    )
    return (
        model.training,
        torch.is_autocast_enabled("cuda"),
        torch.is_autocast_enabled("cpu"),
        params,
    )


def last_parameter(model: torch.nn.Module) -> torch.Tensor | None:
    last = None
    for last in model.parameters():  # noqa: B007 - the loop finds the last one
        pass
    return last


def unguarded() -> Any:
    """The stance that skips guard evaluation (None on a torch without it)."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except TypeError:
        return None
