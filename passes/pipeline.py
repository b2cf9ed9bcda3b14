"""The rewrite as a pipeline: graph -> graph passes in order, the checker after every one.

    refresh: specialize -> [forecast] -> batch -> | lower_stores
    reuse:   specialize -> [forecast] -> prune -> batch -> | elide_loads [-> lower_stores]

Passes after the bar only prepare a variant for compiling (an opaque custom op would be an
unfusable call; a load a needless copy); `Variant.readable` is the graph before them, the one
`explain` shows. `forecast` runs only with a Taylor order (passes/forecast.py). Each
pass's counter says how much it changed (sites specialized, factors added, Linears narrowed,
block runs batched, stores lowered, loads elided).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from .batch import Batched, batch_blocks
from .forecast import forecast
from .prune import prune_chunked_linears
from .sites import Site
from .specialize import clone, elide_loads, lower_stores, specialize
from .verify import verify


@dataclass
class Variant:
    graph: GraphModule  # what is compiled
    readable: GraphModule  # before the lowering passes: what explain shows
    counts: dict[str, int] = field(default_factory=dict)  # pass -> what it changed
    batched: list[Batched] = field(default_factory=list)


def passes(sites: Sequence[Site], refresh: bool, paths: Mapping[str, str] | None, batch: bool,
           lower: bool, order: int) -> list[tuple[str, Callable[[GraphModule], Any]]]:
    """The in-place passes run after `specialize`, in order; (name, pass)."""
    steps: list[tuple[str, Callable[[GraphModule], Any]]] = []
    if order:
        steps.append(("forecast", lambda g: forecast(g, sites, order, refresh)))
    if not refresh:  # adaLN: only the gate chunks of a modulation Linear are live on reuse
        steps.append(("prune", prune_chunked_linears))
    if batch:
        steps.append(("batch", lambda g: batch_blocks(g, paths)))
    if lower:
        steps.append(("lower_stores", lower_stores) if refresh else ("elide_loads", elide_loads))
        if order and not refresh:  # the forecast clock's tick
            steps.append(("lower_stores", lower_stores))
    return steps


LOWERING = ("lower_stores", "elide_loads")


def rewrite(gm: GraphModule, sites: Sequence[Site], refresh: bool,
            paths: Mapping[str, str] | None = None, batch: bool = True,
            lower: bool = True, order: int = 0) -> Variant:
    """The refresh or reuse variant of `gm`, checked after every pass. `order`: the Taylor
    order of the forecast (0: reuse replays the cache)."""
    graph = specialize(gm, sites, refresh)
    verify(gm, graph, sites, refresh)
    variant = Variant(graph, graph, {"specialize": sum(len(s.outputs) for s in sites)})
    for name, run in passes(sites, refresh, paths, batch, lower, order):
        if name in LOWERING and variant.readable is graph:
            variant.readable = clone(graph)
        result = run(graph)
        if name == "batch":
            variant.batched = result
        variant.counts[name] = len(result) if isinstance(result, list) else int(result)
        verify(gm, graph, sites, refresh, order)
    return variant
