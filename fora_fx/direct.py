"""Direct calls: a call that may skip the guards skips Dynamo's frame too (config.direct_calls).

Skipping the guards (fora_fx/guards.py) leaves Dynamo's compiled frame, and that frame passes
every parameter to the graph as an input, fetching each one on every call through its module
path (`self.__dict__['_modules']['transformer_blocks']._modules['0']..._parameters['weight']`):
for DiT-XL/2's ~540 inputs about 0.25 ms of host time per call on the dev CPU
(docs/benchmarks.md), as much as a GPU reuse step. Within a generation those inputs are the
same objects on every call but for the call's own arguments, so the frame can be replayed from
a record of one guarded call:

  * inputs: each flat input of the compiled pair is either one of the call's arguments (found
    by identity at a path into args / kwargs: it is read from there again) or one of the
    model's parameters and buffers (kept: a parameter keeps its identity, and an in-place
    load or `p.data = t` is seen through it just as through Dynamo's fetch), or a plain
    tensor attribute of one of its modules (Kandinsky 5's `freqs`: kept while the attribute
    still holds that tensor, which `DirectCall.valid` checks on every call);
  * output: the value the frame returned, as a pytree whose tensor leaves are the pair's
    outputs, by identity, and whose other leaves are plain constants.

It declines (the call goes through Dynamo as before, unguarded) when the frame does more than
that: an input it cannot place, a returned leaf it cannot rebuild, or a pair output that is
not returned. A frame with Python side effects on existing objects (the backend records
whether the trace had any: `CompiledPair.frame_effects`) is neither skipped nor unguarded:
see `skippable`. The record is made again on every guarded call, that is at the start of
every generation.

Entering a torch.compile'd function also advances Dynamo's generation counter
(`GenerationTracker.generation`), and CUDA-graph trees read it: in inference a new generation
is a new iteration, so the previous call's cudagraph outputs may be reused and the next graph
replays as a root. Without it, calls in a row would look like one iteration to the trees,
which then record a new child graph for every step of the first generation while the
previous step's output is still alive (the sampler holds it). A direct call advances the
counter exactly as the skipped entry would; on a torch without it, there are no direct calls.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

try:  # what CUDA-graph trees read to tell one call of a compiled function from the next
    from torch._dynamo.mutation_guard import GenerationTracker as _Generation
except ImportError:  # pragma: no cover - another torch: plan() declines
    _Generation = None  # type: ignore[assignment,misc]

_CONSTANTS = (bool, int, float, str, type(None))

# Where an argument sits in (args, kwargs): a pytree key path, so that a keyword argument is
# found by its name whatever order the call passes them in.
Path = tuple[Any, ...]


@dataclass(frozen=True)
class DirectCall:
    """Replays one Dynamo frame: gathers the pair's inputs, calls it, rebuilds the output."""

    pair: Any  # dispatch.CompiledPair (not imported: dispatch imports this module)
    template: tuple[Any, ...]  # the recorded flat inputs; argument slots are overwritten
    slots: tuple[tuple[int, Path], ...]  # (flat index, where in the call's arguments)
    leaves: tuple[tuple[bool, Any], ...]  # (True, pair output index) or (False, constant)
    spec: pytree.TreeSpec
    attributes: tuple[tuple[Any, str, int], ...] = ()  # (module, name, flat index)

    def valid(self) -> bool:
        """Whether the tensor attributes the frame read are still the recorded tensors (a
        reassigned one needs Dynamo: its guards check it, and may recompile)."""
        return all(vars(m).get(name) is self.template[i] for m, name, i in self.attributes)

    def __call__(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        flat = list(self.template)
        for i, path in self.slots:
            flat[i] = pytree.key_get((args, kwargs), path)
        _Generation.generation += 1  # as entering Dynamo's frame does (see the module doc)
        outs = self.pair(*flat)
        return pytree.tree_unflatten(
            [outs[v] if is_out else v for is_out, v in self.leaves], self.spec
        )


def plan(
    records: Sequence[tuple[Any, tuple, Any]],
    args: tuple,
    kwargs: dict[str, Any],
    out: Any,
    model: torch.nn.Module,
) -> DirectCall | None:
    """The direct call that repeats this guarded call, or None when it cannot be repeated
    exactly (see the module doc). `records`: the (pair, flat inputs, outputs) the frame ran."""
    if _Generation is None:
        return None  # a direct call could not tell CUDA-graph trees a new call began
    if len(records) != 1:
        return None  # no compiled pair ran, or several (a graph break): not one frame call
    pair, flat, outs = records[0]
    if pair.frame_effects is not False or not isinstance(outs, (list, tuple)):
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
        if len(found) == 1:
            slots.append((i, found[0]))
        elif found:
            return None  # the same object at two places
        elif id(value) not in owned:
            held = _tensor_attributes(model) if held is None else held
            if id(value) not in held:
                return None  # an input from elsewhere
            attributes.append((*held[id(value)], i))
    index = {id(t): j for j, t in enumerate(outs)}
    values, spec = pytree.tree_flatten(out)
    leaves: list[tuple[bool, Any]] = []
    for v in values:
        if isinstance(v, torch.Tensor) and id(v) in index:
            leaves.append((True, index[id(v)]))
        elif isinstance(v, _CONSTANTS):
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


def _tensor_attributes(model: torch.nn.Module) -> dict[int, tuple[Any, str]]:
    """id -> (module, attribute name) of tensors held as plain module attributes."""
    held: dict[int, tuple[Any, str]] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                held.setdefault(id(value), (module, name))
    return held


# What the compiled pairs ran during a guarded ForaModule call, for `plan`.
_recording = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[Any, tuple, Any]]]:
    """Collects (pair, flat inputs, outputs) of every compiled-pair call inside."""
    previous = getattr(_recording, "calls", None)
    calls: list[tuple[Any, tuple, Any]] = []
    _recording.calls = calls
    try:
        yield calls
    finally:
        _recording.calls = previous


def record(pair: Any, args: tuple, outs: Any) -> None:
    calls = getattr(_recording, "calls", None)
    if calls is not None:
        calls.append((pair, args, outs))


def frame_effects() -> bool | None:
    """Whether the frame Dynamo is compiling now mutates an existing Python object (called from
    the backend, during compilation); None if that cannot be told (another Dynamo version, or
    no frame). New objects, such as the model's output dataclass, do not count."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew

        tx = InstructionTranslator.current_tx()
        effects = tx.output.side_effects
        new = (AttributeMutationNew, ValueMutationNew)
        return bool(effects.tensor_hooks) or any(
            effects.is_modified(v) and not isinstance(v.mutation_type, new)
            for v in effects.id_to_variable.values()
        )
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return None


def skippable(records: Sequence[tuple[Any, tuple, Any]]) -> bool:
    """Whether calls repeating this one may skip Dynamo's guards: not if its frame has Python
    side effects. Dynamo replays a mutation as the value it traced (`self.calls[:] = [1]`) and
    guards on what it read (the list's length), so an unguarded call would replay a stale one.
    Unknown effects do not stop it (guards.py names that hole); they do stop direct calls."""
    return len(records) == 1 and records[0][0].frame_effects is not True
