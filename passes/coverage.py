"""Repeated blocks in which the locator found nothing: FORA's silent misses, made visible.

The patterns (passes/patterns.py) know attention, linear attention and MLPs. A block built
around another token mixer (a state-space scan, a mixer written inline without a module of
its own) yields neither a site nor a refusal, and the model would run that block in full on
every reuse step without a word. A run of same-class numbered modules (`blocks.0`, `blocks.1`,
...) is what a DiT's backbone looks like; when some of its blocks hold no site and no refused
candidate, `explain` lists them. A block that holds a site can still hide another mixer (a
gated-delta-net beside a cross-attention): `uncached_compute` lists the modules of repeated
blocks whose projections read the token stream outside every candidate region.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping

from torch.fx import Node

from .paths import block_key, block_path, module_class, node_path, outer_block, path_order
from .patterns import is_projection, is_token_product
from .sites import Refusal, Site

# A backbone block computes more than this many nodes; Sequential members of an embedder
# (Linear, SiLU, Linear: one node each) and small numbered helpers stay below it.
MIN_BLOCK_NODES = 8


def uncovered_blocks(
    nodes: Iterable[Node],
    paths: Mapping[str, str],
    sites: Iterable[Site],
    refused: Iterable[Refusal],
) -> list[str]:
    """"<container>.<i>" of every repeated block with no site and no refused candidate."""
    size: dict[tuple[str, int], int] = defaultdict(int)
    cls: dict[tuple[str, int], str] = {}
    for n in nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        found = block_key(n, paths)
        if found is None:
            continue
        container, idx, key = found
        size[(container, idx)] += 1
        cls.setdefault((container, idx), module_class(n, key))
    blocks = [b for b, count in size.items() if count > MIN_BLOCK_NODES]
    per_class: dict[tuple[str, str], int] = defaultdict(int)
    for b in blocks:
        per_class[(b[0], cls[b])] += 1
    covered = [s.module_path for s in sites] + [r.module_path for r in refused]
    out = []
    for container, idx in blocks:
        if per_class[(container, cls[(container, idx)])] < 2:
            continue  # not a run of repeated blocks
        prefix = f"{container}.{idx}"
        if not any(p == prefix or p.startswith(prefix + ".") for p in covered):
            out.append(prefix)
    return out


def downstream(start: Iterable[Node]) -> set[Node]:
    """Every node that depends on one of `start` (not including `start` itself)."""
    seen: set[Node] = set()
    todo = list(start)
    while todo:
        for u in todo.pop().users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def uncached_compute(
    nodes: Iterable[Node],
    paths: Mapping[str, str],
    regions: Iterable[set[Node]],
    skip: Iterable[str],
    sites: Iterable[str] = (),
    attention_blocks: Collection[str] = (),
    known_sites: Collection[str] = (),
) -> list[str]:
    """Modules ("blocks.3.attn", or "blocks.3" for a block's own code) of repeated blocks
    whose projections or token products read the token stream outside every candidate
    region: what they compute runs in full on every reuse step, unmentioned otherwise.

    The token stream is what descends from a candidate region inside a numbered block; the
    conditioning (a timestep embedding feeding adaLN Linears, even one pooled by a cached
    attention outside the blocks) does not, so it is never listed. The same module of
    another block of the run is listed with it. `regions`: every candidate, cached or not
    (a refused or deselected one is explained elsewhere); `skip`: module-path prefixes
    already reported (refusals, blocks with no candidate at all). A module named like one of
    `sites` (Lumina-Next runs `attn2.to_out` from its block, outside the cached `attn2`) is
    named one level deeper ("layers.0.attn2.to_out"). `attention_blocks`: blocks whose
    attention an earlier graph of a piecewise model holds, passed for a graph that holds no
    attention itself (a piece of a module Dynamo could not capture whole, such as
    HiDream-I1's mixture of experts): there, their projections are taken to be on the
    stream. `known_sites`: sites of a piecewise model's other graphs; a module holding one
    is named a level deeper too (HiDream's "double_stream_blocks.0.block", which holds the
    cached attention, -> "double_stream_blocks.0.block.ff_i").
    """
    regions = [r for r in regions if any(block_path(n, paths) for n in r)]
    covered: set[Node] = set().union(*regions) if regions else set()
    stream = downstream(n for r in regions for n in r if any(u not in r for u in n.users))
    loose = set(attention_blocks)
    skip, sites = tuple(skip), set(sites)
    holders = {p.rsplit(".", k)[0] for p in known_sites for k in range(1, p.count(".") + 1)}
    # (container, child) -> {"blocks.3.attn": on the stream}
    seen: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for n in nodes:
        if n in covered or not (is_projection(n) or is_token_product(n)):
            continue
        path = node_path(n, paths)
        prefix = None if path is None else outer_block(path)
        if path is None or prefix is None:
            continue
        where = prefix
        if path.startswith(prefix + "."):
            for part in path[len(prefix) + 1:].split("."):
                where += "." + part
                if where not in sites and where not in holders:
                    break
        child = where[len(prefix) + 1:]
        if any(where == s or where.startswith(s + ".") or s.startswith(where + ".")
               for s in skip):
            continue
        found = seen[(prefix.rpartition(".")[0], child)]
        found[where] = found.get(where, False) or n in stream or prefix in loose
    # The first block of a run reads the stream before any candidate output reaches it; its
    # module is listed when the same module of a later block in the run is.
    out = [w for found in seen.values() if any(found.values()) for w in found]
    return sorted(out, key=path_order)
