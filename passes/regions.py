"""Whether a candidate region may be cached, and if not, why (the reason `explain` shows).

Caching a region is FORA only when its outputs are a residual branch computed from its
inputs by the attention / MLP core, and nothing else is lost by skipping it:
  * no output has a term computed from the region's inputs without passing a core (a
    residual added inside the module, which caching would freeze); a factor computed from
    the inputs that scales a core value (a gate, a rotary decode) is fine; only value
    dependencies count (passes/effects.py);
  * it writes in place only into memory it allocated, and has no other side effects;
  * its outputs have static shapes;
  * it is convex: nothing outside it sits between two of its nodes;
  * some output is added to something it does not produce: a residual branch. A cached
    model head (Linear -> act -> Linear after the last block) would freeze the output itself.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from .effects import Memory, data_inputs, is_local_assert, is_local_wait
from .patterns import is_parameter


def check_region(
    nodes: list[Node], order: dict[Node, int], region: set[Node], cores: set[Node],
    memory: Memory,
) -> tuple[list[Node], str | None]:
    """Returns the region's outputs, or a reason why it cannot be cached. `memory` is the
    graph's storage and write analysis (passes/effects.py)."""
    outputs = sorted(
        (n for n in region if any(u not in region for u in n.users)), key=order.__getitem__
    )
    if not outputs:
        return outputs, "the region has no output used outside it"
    # In-place writes are allowed only into memory the region allocated itself (Wan's
    # rotary embedding fills an empty_like buffer; a rotary table built per call divides an
    # arange in place); they are dropped with the region.
    writes: dict[Node, list[Node]] = {}
    for n in sorted(region, key=order.__getitem__):
        targets = memory.writes.get(n, [])
        for target in targets:
            base = memory.owner(target)
            if base is None or base not in region:
                return outputs, f"node {n.name} writes {target.name} in place"
            # The refresh graph stores an output right where it is computed; a later write
            # into it would be missed.
            written = memory.aliases(base, region) & set(outputs)
            if written:
                earliest = min(written, key=order.__getitem__)
                return outputs, f"output {earliest.name} is written in place by {n.name}"
        if targets:
            writes[n] = targets
        elif n.is_impure() and not (is_local_assert(n, region) or is_local_wait(n, region)):
            return outputs, f"node {n.name} has side effects"
        if any(memory.storages.get(a, frozenset()) & memory.unexplained
               for a in (n, *n.all_input_nodes)):
            return outputs, (f"node {n.name} uses memory that an op fora_fx cannot identify "
                             "writes in place")
    for n in outputs:
        val = n.meta.get("example_value")
        if not isinstance(val, torch.Tensor):
            return outputs, f"output {n.name} is not a single tensor"
        if not all(isinstance(s, int) for s in val.shape):
            return outputs, (
                f"output {n.name} has a symbolic shape {tuple(val.shape)}; "
                "compile with dynamic=False"
            )
    # Bypass: an output with a term that does not pass a core means the module adds its
    # input back in (a residual inside the module); caching it would freeze the residual
    # stream on reuse steps. A core value *scaled* by one computed from the input (SanaWM's
    # gated attention, attn * silu(gate(x)); an inverse rotary embedding) has no such term.
    core_free = _core_free_terms(region, order, cores, writes, memory)
    leaked = [n.name for n in outputs if core_free.get(n)]
    if leaked:
        return outputs, (
            f"output {leaked[0]} depends on the module input outside the attention/MLP core "
            "(a residual added inside the module?)"
        )
    if not feeds_residual(outputs, region):
        return outputs, (
            f"output {outputs[0].name} is not added to a residual stream (a model head?): "
            "caching it would freeze what it computes"
        )
    # Convexity: nothing outside the region may sit between two region nodes.
    first = min(order[n] for n in region)
    last = max(order[n] for n in region)
    after: set[Node] = set()
    for n in nodes[first : last + 1]:
        if n in region:
            continue
        if any(a in region or a in after for a in n.all_input_nodes):
            after.add(n)
            if any(u in region for u in n.users):
                return outputs, f"node {n.name} outside the region both reads and feeds it"
    return outputs, None


_CORE, _FREE = 1, 2  # a value has a term carried by a core / a term from inputs alone
# Products: every term of the result is a product of one term of each factor. SanaWM decodes
# its camera attention's output back to world space with einsum / complex multiplies.
_SCALES = {operator.mul, torch.mul, "mul", torch.einsum, torch.matmul, operator.matmul,
           torch.bmm, "matmul", "bmm"}


def _core_free_terms(
    region: set[Node], order: dict[Node, int], cores: set[Node], writes: dict[Node, list[Node]],
    memory: Memory,
) -> dict[Node, bool]:
    """For each region node: does its value have a term that depends on the region's inputs
    but on no core? Sums and other ops keep every input's terms; a product's term is
    core-free only when every factor that depends on the inputs has a core-free term.
    Only value dependencies count (out.type_as(query) reads query's dtype, not its values);
    an in-place write gives its terms to the buffer it writes and every view of it."""
    state: dict[Node, int] = {}
    for n in sorted(region, key=order.__getitem__):
        if n in cores:
            state[n] = state.get(n, 0) | _CORE
            continue
        ins = [
            0 if is_parameter(a) else state.get(a, 0) if a in region else _FREE
            for a in data_inputs(n)
            if _carries_values(a)
        ]
        s = 0
        for x in ins:
            s |= x
        if n.op in ("call_function", "call_method") and n.target in _SCALES:
            varying = [x for x in ins if x]
            if not all(x & _FREE for x in varying):
                s &= ~_FREE
        state[n] = state.get(n, 0) | s
        for target in writes.get(n, ()):
            for a in memory.aliases(target, region):
                state[a] = state.get(a, 0) | s
    return {n: bool(x & _FREE) for n, x in state.items()}


def _carries_values(node: Node) -> bool:
    """Whether `node`'s values can be a term of a float result: integer and boolean tensors
    (indices, masks) only select where values go (NucleusMoE scatters its experts' rows to
    the tokens its router picked with `out.scatter_add(0, idx, rows)`)."""
    val = node.meta.get("example_value")
    return not isinstance(val, torch.Tensor) or val.is_floating_point() or val.is_complex()


_ADDS = {operator.add, operator.sub, operator.iadd, torch.add, torch.sub, torch.addcmul,
         "add", "sub", "add_", "addcmul"}


def feeds_residual(outputs: list[Node], region: set[Node], reach: int = 32) -> bool:
    """Whether some output, within `reach` nodes downstream, is added to (or subtracted from)
    a tensor it does not produce: the residual stream a cached branch joins."""
    for out in outputs:
        seen, todo = {out}, [out]
        while todo and len(seen) < reach:
            n = todo.pop(0)
            for u in n.users:
                if u in region or u in seen:
                    continue
                seen.add(u)
                todo.append(u)
                if u.op in ("call_function", "call_method") and u.target in _ADDS:
                    if any(a not in seen for a in u.all_input_nodes):
                        return True
    return False
