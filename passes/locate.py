"""Locate pass: find FORA's cache sites in a Dynamo-captured graph, model-agnostically.

A site is the region of one module call (nodes sharing an nn_module_stack key) that is
  * an attention: the innermost module around an attention core (SDPA, softmax fed into a
    matmul, or a linear attention's (V K^T) Q), classed "cross_attn" when its keys come from
    other inputs than its queries;
  * an MLP: the innermost module around Linear -> activation -> Linear (or convolutions, as
    in Sana; or a SwiGLU's two Linears of one input) operating on the token stream
    (downstream of some attention, or reading an attention's input), which excludes
    timestep / caption embedders;
  * a parallel block (Flux single blocks; Flux 2's, all in one attention module): an
    attention and an MLP half concatenated into a shared output projection; the
    projection's output is the cache point.
The module boundary is FORA's cache point: in DiT-style blocks the gate multiply and the
residual add sit outside the attention / MLP module (diffusers' DiT, PixArt, SD3, Flux).

A candidate is refused (with a reason) when caching it would not be FORA: passes/regions.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from .coverage import downstream, uncached_compute, uncovered_blocks
from .effects import Memory
from .lora import find_adapted
from .paths import module_stack, normalize_path, outer_block
from .patterns import (
    Projections,
    attention_qk,
    is_attention_core,
    is_expert_projection,
    is_parameter,
    is_token_product,
    mlp_chain,
    parallel_chain,
)
from .regions import check_region
from .sites import LocateResult, Refusal, Site


@dataclass
class Candidate:
    """A module region that may become a site: what it is and the nodes that make it so."""

    key: str  # the nn_module_stack key naming the module (or its frame / MLP projection)
    kind: str  # "attn", "cross_attn", "mlp" or "parallel"
    cores: set[Node]  # attention cores, MLP projections: every output must pass through one
    region: set[Node]  # the nodes cached; all of the module's, or an inline MLP's
    outputs: list[Node] = field(default_factory=list)  # once checked (passes/regions.py)


class _Graph:
    """Per-graph indexes the locator needs: order, module regions, stream reachability."""

    def __init__(self, gm: GraphModule, paths: Mapping[str, str] | None):
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.memory = Memory(self.nodes)
        self.regions: dict[str, list[Node]] = {}
        self.path_text: dict[str, str] = {}
        for n in self.nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            for key, text in module_stack(n):
                self.regions.setdefault(key, []).append(n)
                self.path_text.setdefault(key, text)
        self.paths = paths or {}
        self.frames: dict[str, str] = {}  # key -> path of modules that are a graph's root

    def path(self, key: str) -> str:
        if key in self.frames:
            return self.frames[key]
        base = key.split("@")[0]
        if base in self.paths:
            path = self.paths[base]
        else:
            path = normalize_path(self.path_text.get(key, key))
        return path + (f"@{key.split('@')[1]}" if "@" in key else "")

    def innermost_key(self, node: Node) -> str | None:
        stack = module_stack(node)
        return stack[-1][0] if stack else None

    def frame_key(self, node: Node) -> str | None:
        """A key for the module whose own forward is this graph (Dynamo compiled a block's
        frame, piecewise): it is in no node's stack, so it is named from the path of the
        node's module's parent ("blocks.3.proj_out" -> "blocks.3")."""
        key = self.innermost_key(node)
        parent = self.path(key).rpartition(".")[0] if key is not None else ""
        if not parent:
            return None
        self.frames[f"<frame {parent}>"] = parent
        return f"<frame {parent}>"

    def lca_key(self, *nodes: Node) -> str | None:
        """The innermost module every one of `nodes` runs in."""
        common = None
        for level in zip(*(module_stack(n) for n in nodes), strict=False):
            if len({k for k, _ in level}) != 1:
                break
            common = level[0][0]
        return common


def _region_sources(node: Node, region: set[Node]) -> set[Node]:
    """Non-parameter region inputs that `node` depends on through the region."""
    found: set[Node] = set()
    seen: set[Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in region:
                todo.append(a)
            elif not is_parameter(a):
                found.add(a)
    return found


def _site_meta(outputs: list[Node]) -> tuple[tuple, tuple, int]:
    shapes, dtypes, nbytes = [], [], 0
    for n in outputs:
        val = n.meta["example_value"]
        shapes.append(tuple(int(s) for s in val.shape))
        dtypes.append(str(val.dtype).replace("torch.", ""))
        nbytes += math.prod(val.shape) * val.element_size()
    return tuple(shapes), tuple(dtypes), nbytes


def locate(
    gm: GraphModule,
    paths: Mapping[str, str] | None = None,
    kinds: Sequence[str] = ("attn", "cross_attn", "mlp", "parallel"),
    earlier_sites: Sequence[Site] = (),
) -> LocateResult:
    """Finds cache sites in `gm`. `paths` maps str(id(module)) -> qualified name, if known.

    With "parallel" in `kinds`, a parallel block's fused attention + MLP output is one site
    and its attention is not a site of its own; without it, only the attention is cached.
    `earlier_sites`: the sites of the same model's earlier graphs (a model Dynamo captures
    piecewise). An MLP inside a block ("blocks.3") whose attention one of them holds reads
    the token stream although no attention precedes it in this graph; they also name
    uncached modules more precisely (passes/coverage.py).
    """
    attention_blocks = {b for s in earlier_sites
                        if s.kind != "mlp" and (b := outer_block(s.module_path)) is not None}
    g = _Graph(gm, paths)
    result = LocateResult()
    candidates: dict[str, Candidate] = {}  # by key

    attn_cores = [n for n in g.nodes if is_attention_core(n)]
    for core in attn_cores:
        key = g.innermost_key(core)
        if key is None:
            result.refused.append(Refusal("<top level>", "attn", "attention outside any module"))
            continue
        region = set(g.regions[key])
        kind = "attn"
        qk = attention_qk(core)
        if qk is not None:
            q_src, k_src = _region_sources(qk[0], region), _region_sources(qk[1], region)
            if q_src and k_src and not (q_src & k_src):
                kind = "cross_attn"
        prev = candidates.get(key)
        if prev is None:
            candidates[key] = Candidate(key, kind, {core}, region)
        else:
            prev.cores.add(core)

    proj = Projections(find_adapted(g.nodes))  # LoRA-adapted Linears count as Linears
    if "parallel" in kinds:
        _add_parallel_blocks(g, candidates, proj)

    # An MLP of the token stream runs after some attention, or beside one on the same input
    # (Flux 3's mode blocks: attn(x) + ff(x), the first of them before any attention);
    # timestep and caption embedders do neither.
    stream = downstream(attn_cores)
    chains: dict[str, list[tuple[Node, set[Node], set[Node]]]] = {}  # key -> (l2, cores, nodes)
    attn_inputs = {a for c in candidates.values() if c.kind != "mlp"
                   for n in c.region for a in n.all_input_nodes if a not in c.region}
    for l2 in g.nodes:
        if not proj.is_projection(l2):
            continue
        found = mlp_chain(l2, proj)
        if found is None:
            continue
        firsts, between = found
        key = g.lca_key(l2, *firsts)
        if key is None:
            continue
        if not (all(l1 in stream for l1 in firsts) or proj.input(firsts[0]) in attn_inputs
                or outer_block(g.path(key)) in attention_blocks):
            continue
        prev = candidates.get(key)
        if prev is not None and prev.kind != "mlp":
            result.refused.append(
                Refusal(g.path(key), "mlp", "MLP fused with attention in one module")
            )
            continue
        if prev is None:
            candidates[key] = Candidate(key, "mlp", {l2, *firsts}, set(g.regions[key]))
        else:
            prev.cores |= {l2, *firsts}
        chains.setdefault(key, []).append((l2, {l2, *firsts}, {l2, *firsts} | between))

    merged = _merge_mlps(g, candidates, set(attn_cores))

    accepted: list[Candidate] = []
    for c in candidates.values():
        if c.kind not in kinds:
            continue
        cores = c.cores
        if c.kind != "mlp":  # every token product of an attention is part of its core
            cores = cores | {n for n in c.region if is_token_product(n)}
        elif c.key not in merged and any(is_expert_projection(n) for n in cores):
            result.refused.append(Refusal(g.path(c.key), c.kind, (
                "routed experts, cacheable only as the whole mixture-of-experts module "
                "(the router picks other tokens every step), which cannot be cached")))
            continue
        c.outputs, reason = check_region(g.nodes, g.order, c.region, cores, g.memory)
        if reason is None:
            accepted.append(c)
            continue
        inline = _inline_mlps(g, chains.get(c.key, []), c.region) if c.kind == "mlp" else []
        if inline:
            accepted += inline
        else:
            result.refused.append(Refusal(g.path(c.key), c.kind, reason))

    # Accepted regions never share nodes; should two overlap anyway, the first in graph
    # order is kept and the other refused, rather than caching one value twice.
    accepted.sort(key=lambda c: g.order[c.outputs[0]])
    kept: list[Candidate] = []
    for c in accepted:
        clash = next((k for k in kept if k.region & c.region), None)
        if clash is not None:
            result.refused.append(
                Refusal(g.path(c.key), c.kind, f"overlaps site {g.path(clash.key)}"))
        else:
            kept.append(c)

    counters: dict[str, int] = {}
    for c in kept:
        idx = counters.get(c.kind, 0)
        counters[c.kind] = idx + 1
        shapes, dtypes, nbytes = _site_meta(c.outputs)
        result.sites.append(Site(
            name=f"{c.kind}_{idx}", kind=c.kind, module_path=g.path(c.key), module_key=c.key,
            nodes=frozenset(n.name for n in c.region),
            outputs=tuple(n.name for n in c.outputs), shapes=shapes, dtypes=dtypes,
            nbytes=nbytes))
    result.uncovered = uncovered_blocks(g.nodes, g.paths, result.sites, result.refused)
    result.uncached = uncached_compute(
        g.nodes, g.paths, [c.region for c in candidates.values()],
        [r.module_path for r in result.refused] + result.uncovered,
        [s.module_path for s in result.sites],
        () if any(c.kind != "mlp" for c in candidates.values()) else attention_blocks,
        [s.module_path for s in earlier_sites])
    return result


def _merge_mlps(g: _Graph, candidates: dict[str, Candidate], attn_cores: set[Node]) -> set[str]:
    """MLPs whose parent module holds nothing but MLPs and what routes between them (a
    mixture of experts: NucleusMoE's `img_mlp` runs a router, its routed `experts` and a
    `shared_expert`) become one site, the parent: FORA caches the feed-forward's output per
    token. Caching the experts alone would replay each expert's rows for the tokens it was
    routed at the refresh step, scattered to whichever tokens the router picks now. Taken
    only when the parent itself may be cached (passes/regions.py) and runs no attention.
    Returns the merged parents' keys."""
    merged: set[str] = set()
    parents: dict[str, list[str]] = {}
    for key, c in candidates.items():
        if c.kind != "mlp":
            continue
        stack = [k for k, _ in module_stack(next(iter(c.region)))]
        if key in stack and stack.index(key) > 0:
            parents.setdefault(stack[stack.index(key) - 1], []).append(key)
    for parent, children in parents.items():
        region = set(g.regions[parent])
        own = candidates.get(parent)  # experts computed inline in the parent
        if (own is not None and own.kind != "mlp") or region & attn_cores:
            continue
        cores = set().union(*(candidates[c].cores for c in children), own.cores if own else ())
        if check_region(g.nodes, g.order, region, cores, g.memory)[1] is not None:
            continue
        for c in children:
            del candidates[c]
        candidates[parent] = Candidate(parent, "mlp", cores, region)
        merged.add(parent)
    return merged


def _inline_mlps(
    g: _Graph, chains: list[tuple[Node, set[Node], set[Node]]], region: set[Node]
) -> list[Candidate]:
    """MLPs computed inline in a block (PRX: `down_proj(act(gate_proj(x)) * up_proj(x))` in
    the block's forward, hand-written DiT blocks calling `fc2(gelu(fc1(x)))`): when the
    smallest module holding an MLP's projections is more than the MLP and cannot be cached,
    the nodes from its first projections to its last are the site, named after the last
    projection's module. All of the module's MLPs must qualify, or none is taken."""
    found = []
    for l2, cores, nodes in chains:
        key = g.innermost_key(l2)
        if nodes == region or key is None:
            return []
        outputs, reason = check_region(g.nodes, g.order, nodes, cores, g.memory)
        if reason is not None:
            return []
        found.append(Candidate(key, "mlp", cores, nodes, outputs))
    return found


def _add_parallel_blocks(g: _Graph, candidates: dict[str, Candidate], proj: Projections) -> None:
    """Merges an attention and the MLP that shares its output projection into one site.

    Flux: the MLP half sits in the block, beside the attention module, whose output leaves
    it; the block's region is the site. Flux 2: the whole parallel block is the attention
    module, whose core is reached from `to_out` through views; that module is the site.
    """
    attn_ends: dict[Node, str] = {}
    for key, c in candidates.items():
        if c.kind == "attn":
            attn_ends.update(dict.fromkeys(c.cores, key))
            attn_ends.update({n: key for n in c.region if any(u not in c.region for u in n.users)})
    for l2 in g.nodes:
        if not proj.is_linear(l2):
            continue
        found = parallel_chain(l2, attn_ends, proj)
        if found is None:
            continue
        chain, l1, reached = found
        attn_keys = {attn_ends[n] for n in reached}
        if len(attn_keys) != 1:
            continue
        (attn_key,) = attn_keys
        block = g.lca_key(l1, l2) or g.frame_key(l2)
        if block is None or attn_key not in candidates:
            continue
        attn = candidates.pop(attn_key)
        candidates[block] = Candidate(block, "parallel", attn.cores | {l1, l2}, attn.region | chain)
