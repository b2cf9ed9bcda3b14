"""LoRA adapters around Linears, seen through as the Linear they adapt.

peft's LoRA layer (peft/tuners/lora/layer.py, `Linear.forward`; diffusers loads LoRAs through
it) computes, for each active adapter,

    result = base_layer(x)
    result = result + lora_B(lora_A(dropout(x))) * scaling
    result = result.to(base dtype)

so in Dynamo's graph a Linear with LoRA is the base `linear` plus, per adapter, two bias-free
`linear`s, a multiply by a constant and an `add`. The locator's patterns ask "is this a
projection, and of what input?"; with LoRA the projection's value is the last `add`, and an
MLP whose first Linear carries a LoRA (Flux LoRAs commonly adapt `ff.net.0.proj`,
`proj_mlp` and `proj_out`) would not be found without looking through it.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch.fx import Node

from .patterns import (
    _matches,
    identity_source,
    is_identity,
    is_linear,
    is_parameter,
    linear_operands,
)

_ADD = {operator.add, torch.add, "add"}
_MUL = {operator.mul, torch.mul, "mul"}


def _through_identities(node: Node, nodes: set[Node]) -> Node:
    """Back from `node` through single-use dropouts and casts, which join `nodes`."""
    while is_identity(node) and len(node.users) == 1:
        nodes.add(node)
        node = node.args[0]  # type: ignore[assignment]
    return node


def _delta(node: Node) -> tuple[Node, set[Node]] | None:
    """`lora_B(lora_A(x)) [* scaling]` -> (x, its nodes), or None."""
    nodes = {node}
    if _matches(node, _MUL):
        factors = [a for a in node.args if isinstance(a, Node)]
        if len(factors) != 1 or len(node.args) != 2:
            return None  # scaling is a Python float, never a tensor
        node = factors[0]
        nodes.add(node)
    if not _bias_free_linear(node):
        return None
    a = node.args[0]
    if not (isinstance(a, Node) and _bias_free_linear(a)):
        return None
    nodes.add(a)
    x = a.args[0]
    if not isinstance(x, Node):
        return None
    return _through_identities(x, nodes), nodes  # the adapter's own dropout / cast of x


def _bias_free_linear(node: Node) -> bool:
    if not is_linear(node) or len(node.users) != 1:
        return False
    _, weight, bias = linear_operands(node)
    return isinstance(weight, Node) and is_parameter(weight) and bias is None


def lora_parts(node: Node) -> tuple[Node, frozenset[Node]] | None:
    """For the output of a LoRA-adapted Linear (the last adapter's `add`): (the base Linear,
    the adapters' nodes: their A and B projections, scalings and adds). None otherwise."""
    parts: set[Node] = set()
    inputs: list[Node] = []
    n = node
    while _matches(n, _ADD) and len(n.args) == 2 and all(isinstance(a, Node) for a in n.args):
        left, right = n.args
        if (found := _delta(right)) is not None:  # type: ignore[arg-type]
            rest = left
        elif (found := _delta(left)) is not None:  # type: ignore[arg-type]
            rest = right
        else:
            return None
        x, nodes = found
        parts |= nodes | {n}
        inputs.append(x)
        # a cast between the base and the sum belongs to the adapters
        n = _through_identities(rest, parts)  # type: ignore[arg-type]
        if len(n.users) != 1:
            return None
    if not parts or not is_linear(n):
        return None
    base_input = identity_source(n.args[0]) if isinstance(n.args[0], Node) else None
    if any(identity_source(x) is not base_input for x in inputs):
        return None  # the adapters must read what the base Linear reads
    return n, frozenset(parts)


def find_adapted(nodes: Iterable[Node]) -> dict[Node, tuple[Node, frozenset[Node]]]:
    """Each LoRA-adapted Linear's output -> (its base Linear, its adapters' nodes). With
    several adapters the adds stack: only the outermost is the Linear's output."""
    found = {n: parts for n in nodes if (parts := lora_parts(n)) is not None}
    inner = {p for n, (_, parts) in found.items() for p in parts if p is not n}
    return {n: parts for n, parts in found.items() if n not in inner}
