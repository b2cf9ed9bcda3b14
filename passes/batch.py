"""Batch pass: run the blocks' conditioning as one computation vmapped over blocks.

Every block of a DiT computes its own modulation from the conditioning alone: an adaLN
Linear (SD3, Flux, PixArt's table add) and, in diffusers' DiT, a whole timestep / class
embedder per block. On a reuse step this is nearly all that is left to run: 28 blocks times
a handful of kernels, each too small to fill a GPU, so the step is bound by kernel count,
not bytes (on an H100, DiT-XL/2 at B=2: a 1.5 ms reuse step against a ~0.1 ms memory
floor).

The blocks run the same code on different weights, so this is one computation vmapped over
blocks. The pass finds, for each run of structurally identical blocks, the nodes that are
the same in every block up to corresponding parameters and inputs shared by all blocks (the
token stream differs per block, so nothing that reads it qualifies), and replaces the G
copies by one `torch.vmap`-traced copy over stacked parameters: Linear -> one bmm, embedding
-> one gather, pointwise ops over [G, ...]. Each stack enters as a placeholder
`fora_stack_<k>` of shape [G, *param.shape]; the runtime supplies it (fora_fx/stacks.py).

Pure graph -> graph. Results equal the unbatched graph's up to floating-point summation
order inside the batched matmuls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from .blocks import COMPUTE, IMPURE, Run, block_of, runs
from .effects import Memory, eliminate_dead_code


@dataclass(frozen=True)
class Stack:
    """One stacked input: `name` is its placeholder, `members` the per-block parameter
    placeholders it stacks, in block order."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Batched:
    """One run of identical blocks whose conditioning was batched."""

    prefix: str  # e.g. "transformer_blocks"
    blocks: tuple[int, ...]
    nodes: int  # nodes per block that were batched
    stacks: tuple[Stack, ...]


def _gather(indices: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    # F.embedding with batched weights vmaps to a copy of every table; indexing is a gather.
    return table[indices]


def _is_plain_embedding(node: Node) -> bool:
    if node.target is not torch.nn.functional.embedding or len(node.args) < 2:
        return False
    extra = [*node.args[2:], *(v for k, v in node.kwargs.items() if k not in ("input", "weight"))]
    return all(v in (None, False, 2.0) for v in extra)


def _template(run: Run, outputs: list[int], owner: GraphModule) -> tuple[GraphModule, list]:
    """Block 0's batched nodes as a function of (shared inputs..., parameters...)."""
    graph = Graph()
    env: dict[Node, Node] = {}
    inputs: list[Any] = []
    for node in run.shared:
        env[node] = graph.placeholder(f"shared_{len(inputs)}")
        inputs.append(node)
    for group in run.groups:
        env[group[0]] = graph.placeholder(f"param_{len(inputs)}")
        inputs.append(group)
    for k in sorted(run.batched):
        n = run.nodes[0][k]
        copy = graph.node_copy(n, lambda v: env[v])
        if _is_plain_embedding(n):
            copy.target, copy.args, copy.kwargs = _gather, (env[n.args[0]], env[n.args[1]]), {}
        env[n] = copy
    graph.output(tuple(env[run.nodes[0][k]] for k in outputs))
    return GraphModule(owner, graph), inputs


def _trace(template: GraphModule, inputs: list[Any], g: int) -> GraphModule | None:
    """make_fx of vmap(template) over stacked parameters, on fake tensors of the inputs'
    metadata (in a fresh fake mode: the graph's own values may belong to another)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    values = [(x[0] if isinstance(x, tuple) else x).meta.get("example_value") for x in inputs]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return None
    dims = tuple(0 if isinstance(x, tuple) else None for x in inputs)

    def batched(*a: Any) -> Any:
        return torch.vmap(template, in_dims=dims)(*a)

    with FakeTensorMode():
        args = [
            torch.empty((g, *v.shape), dtype=v.dtype, device=v.device)
            if d == 0 else torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
            for v, d in zip(values, dims, strict=True)
        ]
        try:
            traced = make_fx(batched, tracing_mode="real")(*args)
        except Exception:  # e.g. an op without a batching rule: leave these blocks alone
            return None
    if any(n.op == "get_attr" for n in traced.graph.nodes):
        return None  # a constant tensor would need a home in the Dynamo graph
    return traced


_RANDOM = ("rand", "dropout", "bernoulli", "normal", "uniform", "multinomial")


def _key(node: Node) -> Any:
    """What makes two pure nodes compute the same value: op, target and argument identity."""
    def norm(x: Any) -> Any:
        if isinstance(x, Node):
            return ("node", id(x))
        if isinstance(x, (list, tuple)):
            return (type(x), tuple(norm(v) for v in x))
        if isinstance(x, dict):
            return (dict, tuple(sorted((k, norm(v)) for k, v in x.items())))
        if isinstance(x, slice):
            return (slice, norm(x.start), norm(x.stop), norm(x.step))
        hash(x)  # raises for an unhashable constant: no key, no merge
        return (type(x), x)

    return (node.op, node.target, norm(node.args), norm(node.kwargs))


def merge_outside_duplicates(gm: GraphModule, paths: Mapping[str, str]) -> int:
    """Replaces nodes outside every block by an identical earlier node, if there is one.

    DiT's final layer re-runs block 0's embedder on the same inputs. Once block 0's copy is
    batched, the two no longer look alike to AOTAutograd's CSE, and the final layer would
    run the embedder a second time (5 kernels per step). Merging them first lets the final
    layer read block 0's batched result. Nodes inside blocks are left alone: merging the
    blocks' identical timestep projections would hide from the batch pass that every block
    computes them.
    """
    seen: dict[Any, Node] = {}
    merged = 0
    # Only values nothing writes are merged (`Memory.stable`): two equal allocations that
    # are written in place are two buffers, and two reads of a tensor written between them
    # are two values.
    memory = Memory(gm.graph.nodes)
    for n in list(gm.graph.nodes):
        if n.op not in COMPUTE or n.target in IMPURE or n.is_impure() or not memory.stable(n):
            continue
        if any(word in str(n.target).lower() for word in _RANDOM):
            continue
        try:
            key = _key(n)
        except TypeError:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = n
        elif block_of(n, paths) is None:
            n.replace_all_uses_with(first)
            gm.graph.erase_node(n)
            merged += 1
    return merged


def batch_blocks(gm: GraphModule, paths: Mapping[str, str] | None = None) -> list[Batched]:
    """Batches the per-block conditioning of every run of identical blocks, in place."""
    paths = paths or {}
    graph = gm.graph
    if merge_outside_duplicates(gm, paths):
        gm.recompile()
    done: list[Batched] = []
    stacked: set[Node] = set()
    memory = Memory(graph.nodes)
    for prefix, idxs, nodes in runs(gm, paths):
        run = Run(nodes)
        run.match(memory)
        if not run.groups or any(p in stacked for grp in run.groups for p in grp):
            continue
        outputs = run.outputs()
        if not outputs:
            continue
        template, inputs = _template(run, outputs, gm)
        traced = _trace(template, inputs, len(idxs))
        if traced is None:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        first_use = min(order[u] for k in outputs for u in run.outside_users(k))
        shared = [x for x in inputs if not isinstance(x, tuple)]
        anchor = max(shared, key=order.__getitem__, default=None)
        if anchor is not None and order[anchor] >= first_use:
            continue  # the shared inputs are not all ready before the first block needs them
        stacks = _splice(gm, run, inputs, traced, outputs, anchor, len(done))
        stacked.update(p for grp in run.groups for p in grp)
        done.append(Batched(prefix, tuple(idxs), len(run.batched), stacks))
    if done:
        eliminate_dead_code(graph)
        graph.lint()
        gm.recompile()
    return done


def _splice(gm: GraphModule, run: Run, inputs: list[Any], traced: GraphModule,
            outputs: list[int], anchor: Node | None, serial: int) -> tuple[Stack, ...]:
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    last = placeholders[-1]
    env: dict[Node, Node] = {}
    stacks: list[Stack] = []
    traced_inputs = list(traced.graph.find_nodes(op="placeholder"))
    for ph, x in zip(traced_inputs, inputs, strict=True):
        if isinstance(x, tuple):
            name = f"fora_stack_{serial}_{len(stacks)}"
            with graph.inserting_after(last):
                node = graph.placeholder(name)
            node.meta["example_value"] = ph.meta.get("val")
            node.meta["fora_stack"] = tuple(p.name for p in x)
            stacks.append(Stack(name, tuple(p.name for p in x)))
            env[ph] = last = node
        else:
            env[ph] = x
    # Compute right after the last shared input (or the placeholders): before any block.
    where = anchor if anchor is not None and anchor.op != "placeholder" else last
    results: list[Node] = []
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            results = list(n.args[0])
            break
        with graph.inserting_after(where):
            copy = graph.node_copy(n, lambda v: env[v])
        copy.meta["example_value"] = n.meta.get("val")
        env[n] = where = copy
    for k, out in zip(outputs, results, strict=True):
        batched_out = env[out]
        for b, block in enumerate(run.nodes):
            with graph.inserting_after(where):
                sel = graph.call_function(torch.ops.aten.select.int, (batched_out, 0, b))
            where = sel
            original = block[k]
            sel.meta["example_value"] = original.meta.get("example_value")
            original.replace_all_uses_with(
                sel, delete_user_cb=lambda u, s=run.inside[b]: u not in s)
    return tuple(stacks)


def stack_names(gm: GraphModule) -> list[tuple[str, tuple[str, ...]]]:
    """(stack placeholder, member placeholders) of a batched graph, in placeholder order."""
    return [
        (n.name, tuple(n.meta["fora_stack"]))
        for n in gm.graph.find_nodes(op="placeholder")
        if "fora_stack" in n.meta
    ]


__all__ = ["Batched", "Stack", "batch_blocks", "stack_names"]
