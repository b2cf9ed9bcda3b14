"""Verify pass: the invariants every rewritten variant keeps (docs/invariants.md).

Raises GraphInvariantError naming the broken invariant; never repairs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.fx import GraphModule

from .sites import Site
from .specialize import LOAD, STORE, buffer_names


class GraphInvariantError(RuntimeError):
    pass


def _fail(variant: str, msg: str) -> None:
    raise GraphInvariantError(f"fora {variant} graph: {msg}")


def verify(
    original: GraphModule, variant: GraphModule, sites: Sequence[Site], refresh: bool
) -> None:
    kind = "refresh" if refresh else "reuse"
    graph = variant.graph
    graph.lint()
    orig_inputs = [n.name for n in original.graph.find_nodes(op="placeholder")]
    inputs = [n.name for n in graph.find_nodes(op="placeholder")]
    expected_bufs = [b for s in sites for b in buffer_names(s)]
    # I1: original inputs first, unchanged and in order; then one cache buffer per site output.
    if inputs != orig_inputs + expected_bufs:
        _fail(kind, f"inputs are {inputs[len(orig_inputs):]}, expected {expected_bufs} appended")
    # I2: same number of outputs as the captured graph.
    n_out = len(original.graph.output_node().args[0])
    if len(graph.output_node().args[0]) != n_out:
        _fail(kind, "output arity changed")
    stores = list(graph.find_nodes(op="call_function", target=STORE))
    loads = list(graph.find_nodes(op="call_function", target=LOAD))
    buf_nodes = {n.name: n for n in graph.find_nodes(op="placeholder") if n.name in expected_bufs}
    names = {n.name for n in graph.nodes}
    if refresh:
        # I3: each buffer written exactly once, by a store of its own site output; no loads.
        if loads:
            _fail(kind, f"contains loads {[n.name for n in loads]}")
        written = sorted(n.args[0].name for n in stores)  # type: ignore[union-attr]
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
        for name, buf in buf_nodes.items():
            for user in buf.users:
                if user.op == "call_function" and user.target is not LOAD:
                    schema = getattr(user.target, "_schema", None)
                    if schema is not None and schema.is_mutable:
                        _fail(kind, f"buffer {name} is mutated by {user.name}")
