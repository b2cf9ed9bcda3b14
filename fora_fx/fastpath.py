"""The fast path of a call that continues a generation (tuning.fast_calls).

Dynamo checks its guards on every call (for a 28-block DiT ~0.5 ms of host time on the dev
CPU), then its frame fetches every parameter through its module path (~0.25 ms for DiT-XL/2's
~540 inputs), while a reuse step on a GPU is a fraction of a millisecond of device time. Both
are skipped where it is known that nothing they check changed:

  * unguarded (`torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, PyTorch's own knob):
    the call continues a generation whose first call was guarded, and repeats the previous
    call's argument structure, tensor shapes / strides / dtypes / devices, non-tensor values,
    model mode, autocast state, and the storage of the model's first and last parameter
    (`model.to(...)` moves both; new parameter objects replace the first). Not seen: a change
    of the model's Python attributes mid-generation (FORA's caches would be stale then anyway).
  * direct: replays the frame from a record of the generation's guarded first call. Each flat
    input of the compiled pair is one of the call's arguments (found by identity at a pytree
    key path: read from there again), one of the model's parameters and buffers (kept: an
    in-place load or `p.data = t` is seen through it as through Dynamo's fetch), or a plain
    tensor attribute of one of its modules (kept while the attribute still holds it). The
    output is rebuilt as a pytree whose tensor leaves are the pair's outputs, by identity.
    Declined (the call is unguarded instead) where the frame does more: an input it cannot
    place, a returned leaf it cannot rebuild, a pair output not returned.

A frame with Python side effects on existing objects is neither (Dynamo replays a mutation as
the value it traced and guards on what it read: an unguarded call would replay a stale one);
the backend records whether the trace had any (`CompiledPair.frame_effects`).

Entering a compiled function also advances Dynamo's generation counter, which CUDA-graph trees
read to tell one call (iteration) from the next; a direct call advances it the same way, and
on a torch without it there are no direct calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

try:  # what CUDA-graph trees read to tell one call of a compiled function from the next
    from torch._dynamo.mutation_guard import GenerationTracker as _Generation
except ImportError:  # pragma: no cover - another torch: no direct calls
    _Generation = None  # type: ignore[assignment,misc]

_SCALARS = (bool, int, float, str, type(None))
Path = tuple[Any, ...]  # a pytree key path into (args, kwargs): keywords found by name
Record = tuple[Any, tuple, Any]  # (compiled pair, its flat inputs, its outputs) of one run


def signature(args: Any, kwargs: Any = None) -> tuple | None:
    """A hashable description of a call's inputs, or None if some input is not plain."""
    try:
        return _describe((args, dict(kwargs or {})))
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
        return (dict, tuple((k, _describe(v)) for k, v in sorted(x.items(), key=lambda kv:
                                                                   str(kv[0]))))
    raise _Opaque


@dataclass(frozen=True)
class DirectCall:
    """Replays one Dynamo frame: gathers the pair's inputs, calls it, rebuilds the output."""

    pair: Any  # compile.CompiledPair, whose entry point routes to the runtime
    template: tuple[Any, ...]  # the recorded flat inputs; argument slots are overwritten
    slots: tuple[tuple[int, Path], ...]  # (flat index, where in the call's arguments)
    leaves: tuple[tuple[bool, Any], ...]  # (True, pair output index) or (False, constant)
    spec: pytree.TreeSpec
    attributes: tuple[tuple[Any, str, int], ...] = ()  # (module, name, flat index)

    def valid(self) -> bool:
        """Whether the tensor attributes the frame read are still the recorded tensors."""
        return all(vars(m).get(name) is self.template[i] for m, name, i in self.attributes)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        flat = list(self.template)
        for i, path in self.slots:
            flat[i] = pytree.key_get((args, kwargs), path)
        _Generation.generation += 1  # as entering Dynamo's frame does (see the module doc)
        outs = self.pair.entry(*flat)
        return pytree.tree_unflatten(
            [outs[v] if is_out else v for is_out, v in self.leaves], self.spec)


class FastPath:
    """What the next call may skip, learnt from the last guarded call of one model."""

    def __init__(self, mode: str, model: torch.nn.Module):
        self.mode = mode  # tuning.fast_calls
        self.model = model
        self.last: tuple | None = None  # (signature, model state) a skip must repeat
        self.direct: DirectCall | None = None
        self._last_param: torch.Tensor | None = None

    def signature(self, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
        return None if self.mode == "off" else signature(args, kwargs)

    def skip(self, sig: tuple | None) -> DirectCall | Any | None:
        """For a call continuing a generation: its DirectCall, else the unguarded stance,
        else None (a guarded call)."""
        if sig is None or self.last != (sig, self._state()):
            return None
        if self.direct is not None and self.direct.valid():
            return self.direct
        if self.direct is not None:  # a tensor attribute was reassigned: through Dynamo
            return None
        try:
            return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        except TypeError:  # a torch without the knob
            return None

    def learn(self, sig: tuple, records: Sequence[Record], args: tuple, kwargs: dict,
              out: Any) -> None:
        """After a guarded call: what the next one must repeat to skip."""
        if self._last_param is None:  # walking all parameters costs ~1 ms: once
            *_, self._last_param = (None, *self.model.parameters())
        skippable = len(records) == 1 and records[0][0].frame_effects is not True
        self.last = (sig, self._state()) if skippable else None
        self.direct = (plan(records[0], args, kwargs, out, self.model)
                       if skippable and self.mode == "direct" else None)

    def _state(self) -> tuple:
        first = next(self.model.parameters(), None)
        return (self.model.training, torch.is_autocast_enabled("cuda"),
                torch.is_autocast_enabled("cpu"),
                tuple((p.data_ptr(), p.dtype, p.device)
                      for p in (first, self._last_param) if p is not None))


def plan(record: Record, args: tuple, kwargs: dict[str, Any], out: Any,
         model: torch.nn.Module) -> DirectCall | None:
    """The direct call that repeats this guarded call, or None (see the module doc)."""
    pair, flat, outs = record
    if _Generation is None or pair.frame_effects is not False or not isinstance(outs,
                                                                                (list, tuple)):
        return None
    paths: dict[int, list[Path]] = {}
    for path, value in pytree.tree_flatten_with_path((args, kwargs))[0]:
        if isinstance(value, torch.Tensor):
            paths.setdefault(id(value), []).append(path)
    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    slots, attributes = [], []
    held: dict[int, tuple[Any, str]] | None = None
    for i, value in enumerate(flat):
        found = paths.get(id(value), [])
        if len(found) > 1:
            return None  # the same object at two places
        if found:
            slots.append((i, found[0]))
        elif id(value) not in owned:
            if held is None:  # id -> (module, name) of tensors held as plain attributes
                held = {}
                for m in model.modules():
                    for name, v in vars(m).items():
                        if isinstance(v, torch.Tensor):
                            held.setdefault(id(v), (m, name))
            if id(value) not in held:
                return None  # an input from elsewhere
            attributes.append((*held[id(value)], i))
    index = {id(t): j for j, t in enumerate(outs)}
    values, spec = pytree.tree_flatten(out)
    leaves: list[tuple[bool, Any]] = []
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) in index:
            leaves.append((True, index[id(v)]))
        elif isinstance(v, _SCALARS):
            leaves.append((False, v))
        else:
            return None
    if {v for is_out, v in leaves if is_out} != set(range(len(outs))):
        return None  # an output the frame used for something other than the return value
    template = list(flat)
    for i, _ in slots:  # read from each call's arguments: hold no stale one
        template[i] = None
    return DirectCall(pair, tuple(template), tuple(slots), tuple(leaves), spec,
                      tuple(attributes))


def frame_effects() -> bool | None:
    """Whether the frame Dynamo is compiling now mutates an existing Python object (called
    from the backend, during compilation); None if that cannot be told. New objects, such as
    the model's output dataclass, do not count."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew

        effects = InstructionTranslator.current_tx().output.side_effects
        new = (AttributeMutationNew, ValueMutationNew)
        return bool(effects.tensor_hooks) or any(
            effects.is_modified(v) and not isinstance(v.mutation_type, new)
            for v in effects.id_to_variable.values())
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return None
