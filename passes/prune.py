"""Prune pass: on a reuse step, compute only the live chunks of a chunked Linear.

adaLN-Zero modulation (DiT, SD3, Flux, timm DiT) is `linear(silu(c), W, b).chunk(6)`: shift,
scale and gate for attention and MLP. On a reuse step the norms and modulation feeding the
cached sites are dead, so only the two gates are read, yet the whole 6*D-wide Linear would
still run. This pass replaces such a Linear + chunk by one Linear per
live chunk over a row slice of W and b (`narrow`: a view, no copy):

    y = linear(x, W, b); a, b_, g, ... = y.chunk(n, dim=-1)      # only g used
 -> g = linear(x, W.narrow(0, k*s, s), b.narrow(0, k*s, s))       # s = out_features / n

Pure graph -> graph; numerically identical (each output feature is its own dot product).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from .effects import eliminate_dead_code
from .lora import find_adapted
from .patterns import CASTS, is_linear, linear_operands

_CHUNK = {torch.chunk, "chunk"}


def _chunk_of(linear: Node) -> tuple[Node, int, list[Node]] | None:
    """The single chunk user of `linear` along its last dim, the number of chunks, and the
    casts between them (peft's LoRA casts its sum back to the base Linear's dtype)."""
    casts: list[Node] = []
    users = list(linear.users)
    while len(users) == 1 and users[0].op == "call_method" and users[0].target in CASTS \
            and users[0].args[0] is (casts[-1] if casts else linear):
        casts.append(users[0])
        users = list(users[0].users)
    if len(users) != 1:
        return None
    chunk = users[0]
    if chunk.op not in ("call_method", "call_function") or chunk.target not in _CHUNK:
        return None
    args = list(chunk.args[1:]) + [None, None]
    n = args[0] if args[0] is not None else chunk.kwargs.get("chunks")
    dim = args[1] if args[1] is not None else chunk.kwargs.get("dim", 0)
    val = linear.meta.get("example_value")
    if not isinstance(n, int) or not isinstance(val, torch.Tensor) or val.ndim == 0:
        return None
    if dim not in (-1, val.ndim - 1) or val.shape[-1] % n:
        return None
    return chunk, n, casts


def prune_chunked_linears(gm: GraphModule) -> int:
    """Returns how many Linears were narrowed to their live chunks."""
    graph = gm.graph
    pruned = 0
    adapted = find_adapted(graph.nodes)  # LoRA on the adaLN Linear: narrow its B too
    for linear in list(graph.nodes):
        if linear not in adapted and (not is_linear(linear) or linear.op != "call_function"):
            continue
        found = _chunk_of(linear)
        if found is None:
            continue
        chunk, n, casts = found
        getters = list(chunk.users)
        if not all(g.target is operator.getitem and isinstance(g.args[1], int) for g in getters):
            continue
        live = sorted({int(g.args[1]) % n for g in getters})
        if len(live) == n:
            continue
        size = linear.meta["example_value"].shape[-1] // n
        for g in getters:
            k = int(g.args[1]) % n
            with graph.inserting_before(g):
                part = _narrowed(graph, linear, adapted.get(linear), k * size, size)
                for cast in casts:
                    part = graph.call_method(cast.target, (part, *cast.args[1:]), cast.kwargs)
            part.meta.update({k2: v for k2, v in g.meta.items() if k2 != "example_value"})
            part.meta["example_value"] = g.meta.get("example_value")
            g.replace_all_uses_with(part)
        eliminate_dead_code(graph)
        pruned += 1
    graph.lint()
    gm.recompile()
    return pruned


def _narrowed(
    graph: torch.fx.Graph, out: Node, lora: tuple[Node, frozenset[Node]] | None,
    start: int, size: int,
) -> Node:
    """Output features [start, start + size) of a Linear, or of a LoRA-adapted one: its base
    and its adapters' B projections narrowed, the A projections (rank-wide) shared by every
    chunk, the scalings and adds copied."""
    if lora is None:
        return _narrow_linear(graph, out, start, size)
    base, parts = lora
    b_side = {p for p in parts if is_linear(p) and p.args[0] in parts and is_linear(p.args[0])}
    env: dict[Node, Node] = {}
    for node in [n for n in graph.nodes if n is base or n in parts]:  # graph order: every
        # copy's inputs are mapped before it
        if node is base or node in b_side:
            env[node] = _narrow_linear(graph, node, start, size, env)
        elif any(a in env for a in node.all_input_nodes):  # scalings and adds; the A side
            env[node] = graph.node_copy(node, lambda a: env.get(a, a))  # stays shared
            _narrow_meta(env[node], node, start, size)
    return env[out]


def _narrow_linear(
    graph: torch.fx.Graph, linear: Node, start: int, size: int, env: dict | None = None
) -> Node:
    x, weight, bias = linear_operands(linear)
    if env is not None:
        x = env.get(x, x)  # type: ignore[arg-type]
    w = graph.call_function(torch.narrow, (weight, 0, start, size))
    b = graph.call_function(torch.narrow, (bias, 0, start, size)) if bias else None
    for new in (w, b):  # the narrows run in the Linear's module, like the Linear
        if new is not None:
            new.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
            val = new.args[0].meta.get("example_value")  # type: ignore[union-attr]
            if isinstance(val, torch.Tensor):
                new.meta["example_value"] = val.narrow(0, start, size)
    part = graph.call_function(linear.target, (x, w, b))
    if env is not None:  # inside a LoRA copy; the caller gives the chunk's own its meta
        _narrow_meta(part, linear, start, size)
    return part


def _narrow_meta(new: Node, old: Node, start: int, size: int) -> None:
    new.meta.update({k: v for k, v in old.meta.items() if k != "example_value"})
    val = old.meta.get("example_value")
    if isinstance(val, torch.Tensor):
        new.meta["example_value"] = val.narrow(-1, start, size)
