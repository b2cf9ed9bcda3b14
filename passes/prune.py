"""Prune pass: on a reuse step, compute only the live chunks of a chunked Linear.

adaLN-Zero modulation (DiT, SD3, Flux, timm DiT) is `linear(silu(c), W, b).chunk(6)`: shift,
scale and gate for attention and MLP. On a reuse step the norms and modulation feeding the
cached sites are dead, so only the two gates are read, yet the whole 6*D-wide Linear would
still run (DESIGN.md section 5). This pass replaces such a Linear + chunk by one Linear per
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
from .patterns import is_linear

_CHUNK = {torch.chunk, "chunk"}


def _chunk_of(linear: Node) -> tuple[Node, int] | None:
    """The single chunk user of `linear` along its last dim, and the number of chunks."""
    users = list(linear.users)
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
    return chunk, n


def prune_chunked_linears(gm: GraphModule) -> int:
    """Returns how many Linears were narrowed to their live chunks."""
    graph = gm.graph
    pruned = 0
    for linear in list(graph.nodes):
        if not is_linear(linear) or linear.op != "call_function":
            continue
        found = _chunk_of(linear)
        if found is None:
            continue
        chunk, n = found
        getters = list(chunk.users)
        if not all(g.target is operator.getitem and isinstance(g.args[1], int) for g in getters):
            continue
        live = sorted({int(g.args[1]) % n for g in getters})
        if len(live) == n:
            continue
        args = list(linear.args) + [None] * 3
        x = args[0]
        weight = args[1] if args[1] is not None else linear.kwargs.get("weight")
        bias = args[2] if args[2] is not None else linear.kwargs.get("bias")
        size = linear.meta["example_value"].shape[-1] // n
        for g in getters:
            k = int(g.args[1]) % n
            with graph.inserting_before(g):
                w = graph.call_function(torch.narrow, (weight, 0, k * size, size))
                b = graph.call_function(torch.narrow, (bias, 0, k * size, size)) if bias else None
                part = graph.call_function(linear.target, (x, w, b))
            for new in (w, b):  # the narrows run in the Linear's module, like the Linear
                if new is not None:
                    new.meta["nn_module_stack"] = linear.meta.get("nn_module_stack", {})
                    val = new.args[0].meta.get("example_value")  # type: ignore[union-attr]
                    if isinstance(val, torch.Tensor):
                        new.meta["example_value"] = val.narrow(0, k * size, size)
            part.meta.update({k2: v for k2, v in g.meta.items() if k2 != "example_value"})
            part.meta["example_value"] = g.meta.get("example_value")
            g.replace_all_uses_with(part)
        eliminate_dead_code(graph)
        pruned += 1
    graph.lint()
    gm.recompile()
    return pruned
