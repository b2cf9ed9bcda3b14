"""Which nodes of a run of identical blocks are the same computation in every block.

The batch pass (passes/batch.py) needs, for each run of structurally identical blocks of one
container (`transformer_blocks.<i>`), the positions whose node in every block is the same op
applied to *corresponding parameters* (same shape and dtype, one per block) and *inputs shared
by all blocks*, or to values computed at an already-matched position. This module finds those
runs and positions; it does not change the graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..ops import LOAD, STORE
from .effects import Memory
from .paths import block_of
from .patterns import is_parameter

COMPUTE = ("call_function", "call_method")
IMPURE = {LOAD, STORE, torch.ops.aten.copy_.default}


class Run:
    """Matches the nodes of one run of blocks position by position."""

    def __init__(self, nodes: list[list[Node]]):
        self.nodes = nodes  # [block][position]
        self.index = [{n: k for k, n in enumerate(block)} for block in nodes]
        self.batched: set[int] = set()
        self.groups: dict[tuple[Node, ...], None] = {}  # parameter groups, in first-use order
        self.shared: dict[Node, None] = {}
        self.inside: list[set[Node]] = []

    def _same(self, a0: Any, others: list[Any], groups: list, shared: list) -> bool:
        if isinstance(a0, (list, tuple)):
            return all(type(a) is type(a0) and len(a) == len(a0) for a in others) and all(
                self._same(x0, [a[i] for a in others], groups, shared) for i, x0 in enumerate(a0)
            )
        if isinstance(a0, torch.Tensor):
            return False  # a tensor constant: == would compare elements
        if not isinstance(a0, Node):
            return all(type(a) is type(a0) and a == a0 for a in others)
        if not all(isinstance(a, Node) for a in others):
            return False
        k0 = self.index[0].get(a0)
        if k0 is not None:  # a value computed in the block: the same position everywhere
            return k0 in self.batched and all(
                self.index[j + 1].get(a) == k0 for j, a in enumerate(others)
            )
        if all(a is a0 for a in others):
            shared.append(a0)
            return True
        group = (a0, *others)
        if all(is_parameter(a) and a.op == "placeholder" for a in group) and len(set(group)) == len(
            group
        ):
            vals = [a.meta.get("example_value") for a in group]
            # Each slice of a stack must start 16-byte aligned, as every parameter did:
            # compiled kernels assume it, and a misaligned input is copied on every call.
            if all(isinstance(v, torch.Tensor) for v in vals) and all(
                v.shape == vals[0].shape and v.dtype == vals[0].dtype for v in vals
            ) and vals[0].numel() * vals[0].element_size() % 16 == 0:
                groups.append(group)
                return True
        return False

    def match(self, memory: Memory) -> None:
        # Only values nothing writes are batched (`Memory.stable`): batching runs a node
        # before every block, so a write in between would be seen too early or not at all,
        # and vmap returns one allocation for every block where each block had its own
        # (NucleusMoE's router sums, torch.zeros(...).scatter_add_(...); a rotary table
        # built per call with torch.arange and divided in place).
        for k, n0 in enumerate(self.nodes[0]):
            ns = [block[k] for block in self.nodes]
            if n0.op not in COMPUTE or n0.target in IMPURE:
                continue
            if not all(memory.stable(n) and not n.is_impure() for n in ns):
                continue
            if not isinstance(n0.meta.get("example_value"), torch.Tensor):
                continue
            if any(n.target != n0.target or set(n.kwargs) != set(n0.kwargs) for n in ns):
                continue
            if any(len(n.args) != len(n0.args) for n in ns):
                continue
            groups: list[tuple[Node, ...]] = []
            shared: list[Node] = []
            ok = all(
                self._same(a0, [n.args[i] for n in ns[1:]], groups, shared)
                for i, a0 in enumerate(n0.args)
            ) and all(
                self._same(v0, [n.kwargs[key] for n in ns[1:]], groups, shared)
                for key, v0 in n0.kwargs.items()
            )
            if ok:
                self.batched.add(k)
                self.groups.update(dict.fromkeys(groups))
                self.shared.update(dict.fromkeys(shared))

        # per block, its batched nodes: a use by anything else makes a value an output
        self.inside = [{block[j] for j in self.batched} for block in self.nodes]

    def outside_users(self, k: int) -> list[Node]:
        """Users, in any block, of the batched value at position k that are not batched."""
        return [u for block, inside in zip(self.nodes, self.inside, strict=True)
                for u in block[k].users if u not in inside]

    def outputs(self) -> list[int]:
        """Batched positions whose value is read outside the batched nodes of its block."""
        return [k for k in sorted(self.batched) if self.outside_users(k)]


def runs(
    gm: GraphModule, paths: Mapping[str, str]
) -> list[tuple[str, list[int], list[list[Node]]]]:
    """Runs of blocks with the same op sequence: (prefix, block indices, nodes per block)."""
    by_block: dict[tuple[str, int], list[Node]] = {}
    for n in gm.graph.nodes:
        if n.op in COMPUTE:
            where = block_of(n, paths)
            if where is not None:
                by_block.setdefault(where, []).append(n)
    classes: dict[tuple[str, tuple], list[int]] = {}
    for (prefix, idx), nodes in sorted(by_block.items(), key=lambda kv: kv[0]):
        signature = tuple((n.op, str(n.target), len(n.args)) for n in nodes)
        classes.setdefault((prefix, signature), []).append(idx)
    return [
        (prefix, idxs, [by_block[(prefix, i)] for i in idxs])
        for (prefix, _), idxs in classes.items()
        if len(idxs) >= 2
    ]


__all__ = ["COMPUTE", "IMPURE", "Run", "block_of", "runs"]
