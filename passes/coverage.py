"""Repeated blocks in which the locator found nothing: FORA's silent misses, made visible.

The patterns (passes/patterns.py) know attention, linear attention and MLPs. A block built
around another token mixer (a state-space scan, a mixer written inline without a module of
its own) yields neither a site nor a refusal, and the model would run that block in full on
every reuse step without a word. A run of same-class numbered modules (`blocks.0`, `blocks.1`,
...) is what a DiT's backbone looks like; when some of its blocks hold no site and no refused
candidate, `explain` lists them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from torch.fx import Node

from .paths import block_key, module_class
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
