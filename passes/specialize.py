"""Rewrite pass: wrap each site in cache-store / cache-load nodes, one graph per decision.

FORA's per-step decision is known on the host before the step runs, so instead of a
`torch.cond` on a step tensor (which disables CUDA graphs and syncs on the predicate) the
rewritten graph is specialised on the decision:

  refresh: every site computes; `fora_store_<site>` copies each output into its cache buffer.
  reuse:   every site output is replaced by `fora_load_<site>` of its buffer; the region and
           whatever only fed it (norms, modulation chunks) become dead and are removed.

Cache buffers enter as extra placeholders `fora_cache_<site>` after the original inputs, in
site order, marked as static inputs (their address never changes; they are written in place).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.fx import Graph, GraphModule, Node

from ..ops import LOAD, STORE
from .effects import eliminate_dead_code
from .sites import Site

# GraphModule attributes Dynamo/AOTAutograd read (a deepcopy drops them,
# and then AOT marks no input static and CUDA graphs copy every weight on every replay).
_DYNAMO_ATTRS = ("_param_name_to_source", "compile_subgraph_reason")


def buffer_names(site: Site) -> list[str]:
    if len(site.outputs) == 1:
        return [f"fora_cache_{site.name}"]
    return [f"fora_cache_{site.name}_{i}" for i in range(len(site.outputs))]


def clone(gm: GraphModule) -> GraphModule:
    """A GraphModule with a fresh copy of the graph, keeping Dynamo's metadata."""
    graph = Graph()
    val_map: dict[Node, Node] = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    new = GraphModule(gm, graph)
    new.meta = dict(gm.meta)
    for attr in _DYNAMO_ATTRS:
        if hasattr(gm, attr):
            setattr(new, attr, getattr(gm, attr))
    for old, node in val_map.items():
        if hasattr(old, "_dynamo_source"):
            node._dynamo_source = old._dynamo_source  # type: ignore[attr-defined]
    return new


def add_cache_inputs(gm: GraphModule, sites: Sequence[Site]) -> dict[str, Node]:
    """Appends one placeholder per cached output; returns name -> placeholder."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    anchor = placeholders[-1] if placeholders else None
    by_name = {n.name: n for n in graph.nodes}
    added: dict[str, Node] = {}
    for site in sites:
        for name, out in zip(buffer_names(site), site.outputs, strict=True):
            ctx = graph.inserting_after(anchor) if anchor else graph.inserting_before(None)
            with ctx:
                ph = graph.placeholder(name)
            ph.meta["example_value"] = by_name[out].meta.get("example_value")
            ph.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            ph.meta["fora_cache"] = site.name
            anchor = ph
            added[name] = ph
    return added


def specialize(gm: GraphModule, sites: Sequence[Site], refresh: bool) -> GraphModule:
    """Returns a new GraphModule: the refresh or the reuse variant of `gm`."""
    new = clone(gm)
    graph = new.graph
    caches = add_cache_inputs(new, sites)
    by_name = {n.name: n for n in graph.nodes}
    for site in sites:
        region = {by_name[n] for n in site.nodes}
        names = buffer_names(site)
        suffixes = [""] if len(names) == 1 else [f"_{i}" for i in range(len(names))]
        for out_name, buf, sfx in zip(site.outputs, names, suffixes, strict=True):
            out = by_name[out_name]
            with graph.inserting_after(out):
                if refresh:
                    node = graph.create_node(
                        "call_function",
                        STORE,
                        (caches[buf], out),
                        name=f"fora_store_{site.name}{sfx}",
                    )
                else:
                    node = graph.create_node(
                        "call_function", LOAD, (caches[buf],), name=f"fora_load_{site.name}{sfx}"
                    )
                    node.meta["example_value"] = out.meta.get("example_value")
                    out.replace_all_uses_with(
                        node, delete_user_cb=lambda u, region=region: u not in region
                    )
            node.meta["fora_site"] = site.name
            node.meta["nn_module_stack"] = out.meta.get("nn_module_stack", {})
    if not refresh:
        # The region and everything that only fed it (norm, modulate, unused adaLN chunks)
        # lost their users; fora::store is mutable, so DCE never touches a refresh graph's stores.
        # A region's in-place writes into its own buffers (locate allows only those) die
        # with it, although DCE keeps mutations by default.
        eliminate_dead_code(graph, removable={n for site in sites for n in site.nodes})
    graph.lint()
    new.recompile()
    return new


def lower_stores(gm: GraphModule) -> int:
    """Replaces each fora::store by an in-place aten copy_ into the buffer, for compiling.

    The store op is what the rewritten graph shows and what verify() checks; as an opaque
    custom op it would also be an unfusable call per site per refresh step (measured ~73 us
    each on CPU, examples/demo.py). An aten copy_ into a graph input is functionalized by
    AOTAutograd into a write Inductor can fuse with the op producing the value. Shapes and
    dtypes were already checked: the buffer is allocated from the output's own metadata.
    """
    graph = gm.graph
    lowered = 0
    for node in list(graph.find_nodes(op="call_function", target=STORE)):
        with graph.inserting_before(node):
            copy = graph.call_function(torch.ops.aten.copy_.default, node.args)
        copy.meta.update(node.meta)
        graph.erase_node(node)
        lowered += 1
    graph.lint()
    gm.recompile()
    return lowered


def elide_loads(gm: GraphModule) -> int:
    """Replaces loads whose value does not leave the graph by the buffer itself.

    The buffer is read-only in a reuse graph, so reading it directly is safe and saves a
    copy per site per step. A load that reaches the graph output keeps its copy: returning
    the persistent buffer would alias state the next refresh overwrites.
    """
    graph = gm.graph
    elided = 0
    for node in list(graph.find_nodes(op="call_function", target=LOAD)):
        if any(u.op == "output" for u in node.users):
            continue
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        elided += 1
    graph.lint()
    gm.recompile()
    return elided
