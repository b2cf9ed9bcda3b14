"""The graph checker run after every pass: lint plus the invariants of docs/invariants.md.

Raises GraphInvariantError naming the broken invariant; never repairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node

from .forecast import CLOCK, forecast_buffers
from .sites import Site
from .specialize import LOAD, STORE, buffer_names


class GraphInvariantError(RuntimeError):
    pass


def _fail(variant: str, msg: str) -> None:
    raise GraphInvariantError(f"fora {variant} graph: {msg}")


def _is_store(node: Node, buffers: set[Node]) -> bool:
    """fora::store, or the in-place copy lower_stores turns it into for compiling."""
    return node.op == "call_function" and (
        node.target is STORE or (node.target is torch.ops.aten.copy_.default
                                 and node.args[0] in buffers))


def verify(
    original: GraphModule, variant: GraphModule, sites: Sequence[Site], refresh: bool,
    order: int = 0,
) -> None:
    """`order`: the graph's Taylor order (passes/forecast.py); 0 before the forecast pass."""
    kind = "refresh" if refresh else "reuse"
    graph = variant.graph
    graph.lint()
    orig_inputs = [n.name for n in original.graph.find_nodes(op="placeholder")]
    placeholders = list(graph.find_nodes(op="placeholder"))
    inputs = [n.name for n in placeholders if "fora_stack" not in n.meta]
    expected_bufs = [b for s in sites for b in buffer_names(s)] + forecast_buffers(sites, order)
    # I1: original inputs first, unchanged and in order; then one cache buffer per site
    # output (with a forecast: its factors, then the clock); then the batch pass's
    # parameter stacks, if any.
    if inputs != orig_inputs + expected_bufs or any(
            "fora_stack" not in n.meta for n in placeholders[len(inputs):]):
        _fail(kind, f"inputs are {[n.name for n in placeholders][len(orig_inputs):]}, "
                    f"expected {expected_bufs} (then parameter stacks) appended")
    # I2: same number of outputs as the captured graph.
    if len(graph.output_node().args[0]) != len(original.graph.output_node().args[0]):
        _fail(kind, "output arity changed")
    buffers = {n for n in placeholders if n.name in expected_bufs}
    stores = [n for n in graph.nodes if _is_store(n, buffers)]
    clock_stores = [n for n in stores if n.args[0].name == CLOCK]  # type: ignore[union-attr]
    if order and len(clock_stores) != 1:
        _fail(kind, f"writes the forecast clock {len(clock_stores)} times, expected once")
    stores = [n for n in stores if n not in clock_stores]
    # I6: a buffer is read before it is written: a read after its store would see this
    # step's value (the eager graph writes in place), not the previous full step's.
    position = {n: i for i, n in enumerate(graph.nodes)}
    for store in [*stores, *clock_stores]:
        late = [u.name for u in store.args[0].users  # type: ignore[union-attr]
                if u is not store and position[u] > position[store]]
        if late:
            _fail(kind, f"{', '.join(late)} read(s) {store.args[0]} after {store.name} "
                        "wrote it")
    loads = list(graph.find_nodes(op="call_function", target=LOAD))
    names = {n.name for n in graph.nodes}
    if refresh:
        # I3: each buffer written exactly once, by a store of its own site output; no loads.
        if loads:
            _fail(kind, f"contains loads {[n.name for n in loads]}")
        written = sorted(n.args[0].name for n in [*stores, *clock_stores])  # type: ignore
        if written != sorted(expected_bufs):
            _fail(kind, f"buffers written {written}, expected each of {sorted(expected_bufs)} once")
        for site in sites:
            for out in site.outputs:
                if out not in names:
                    _fail(kind, f"site {site.name} lost its output {out}")
    else:
        # I4: no store; no node of any site region survives; buffers are only read.
        if stores:
            _fail(kind, f"contains stores {[n.name for n in stores]}")
        for site in sites:
            alive = sorted(site.nodes & names)
            if alive:
                _fail(kind, f"site {site.name} still computes {alive[:5]}")
        for buf in buffers:
            for user in buf.users:
                if user in clock_stores:
                    continue
                schema = getattr(user.target, "_schema", None)
                if user.target is not LOAD and schema is not None and schema.is_mutable:
                    _fail(kind, f"buffer {buf.name} is mutated by {user.name}")
