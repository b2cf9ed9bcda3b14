"""Forecast pass: reuse steps return a Taylor forecast of each cached output, not a replay.

TaylorSeer (arXiv 2503.06923): each full step keeps a site's output y and its divided
differences up to order m,

    F_0 = y,    F_{j+1} = (F_j - F_j^prev) / g      (g: steps since the previous full step)

where F^prev are the factors of the previous full step (a factor exists only once enough full
steps have run: F_j after j + 1 of them, else it is 0). A reuse step d steps after the last
full one returns

    y(d) = sum_j F_j * d**j / j!

The distance d and the gap g change every step, so they cannot be Python constants of the
graphs (Dynamo would specialise on them, one recompile per value) nor host values passed in
(a CPU tensor input makes CUDA graphs skip the graph; a device copy of a host value per step
is a transfer). They live on the device, in a two-element float32 buffer `fora_clock`
= [d, full steps so far] that the graphs update themselves:

    refresh:  reads g = d + 1 and the count, writes [0, count + 1]
    reuse:    reads and writes [d + 1, count]

The runtime zeroes the clock, outside the graphs, when a cache starts cold (a new generation,
or after an error): the next full step then keeps F_0 only. Each factor F_j (j >= 1) is a cache
buffer `<buffer>_d<j>` of the output's dtype next to the output's own; the arithmetic runs in
at least float32 and is stored in that dtype.

This pass runs right after `specialize` on both variants (the same placeholders in the same
order: the runtime passes one buffer list to either), before the passes that narrow or batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

from ..ops import LOAD, STORE
from .sites import Site
from .specialize import buffer_names

CLOCK = "fora_clock"


def factor_names(site: Site, order: int) -> list[str]:
    """The buffers `forecast` adds for one site's outputs, in placeholder order."""
    return [f"{b}_d{j}" for b in buffer_names(site) for j in range(1, order + 1)]


def forecast_buffers(sites: Sequence[Site], order: int) -> list[str]:
    """Every buffer the pass appends after specialize's: the factors, then the clock."""
    if order == 0:
        return []
    return [n for s in sites for n in factor_names(s, order)] + [CLOCK]


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# The graph functions below are traced into aten ops when a variant is compiled (Inductor
# fuses them with the store or the consumer) and run as written under compiler="eager". None
# of them reads a device value on the host.

def taylor_difference(new: Tensor, old: Tensor, clock: Tensor, j: int) -> Tensor:
    """F_j of this full step from F_{j-1} (`new`) and the previous step's F_{j-1} (`old`);
    0 while fewer than j full steps preceded this one (no previous F_{j-1})."""
    diff = (new.to(_compute(new.dtype)) - old.to(_compute(old.dtype))) / (clock[0] + 1)
    return torch.where(clock[1] >= j, diff, torch.zeros_like(diff))


def taylor_forecast(clock: Tensor, *factors: Tensor) -> Tensor:
    """sum_j F_j * d**j / j!, d = clock[0] (the clock after this reuse step's tick)."""
    d = clock[0]
    out = factors[0].to(_compute(factors[0].dtype))
    coeff = torch.ones_like(d)
    for j, factor in enumerate(factors[1:], start=1):
        coeff = coeff * d / j
        out = out + factor.to(out.dtype) * coeff
    return out.to(factors[0].dtype)


def tick_refresh(clock: Tensor) -> Tensor:
    return torch.stack((clock[0] * 0, clock[1] + 1))


def tick_reuse(clock: Tensor) -> Tensor:
    return torch.stack((clock[0] + 1, clock[1]))


def _like(value: object, shape: tuple[int, ...], dtype: torch.dtype) -> object:
    """An example value for a new node: in the example's fake mode when it has one."""
    if not isinstance(value, Tensor):
        return None
    import contextlib

    mode = getattr(value, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty(shape, dtype=dtype, device=value.device)


def forecast(gm: GraphModule, sites: Sequence[Site], order: int, refresh: bool) -> int:
    """Adds the factor and clock buffers and the Taylor nodes; returns the outputs forecast."""
    graph = gm.graph
    by_name = {n.name: n for n in graph.nodes}
    anchor = [n for n in graph.find_nodes(op="placeholder") if "fora_cache" in n.meta][-1]
    factors: dict[str, list[Node]] = {}  # base buffer -> [F_0 buffer, F_1 buffer, ...]
    for site in sites:
        for base in buffer_names(site):
            factors[base] = [by_name[base]]
            for j in range(1, order + 1):
                with graph.inserting_after(anchor):
                    anchor = graph.placeholder(f"{base}_d{j}")
                anchor.meta.update(by_name[base].meta)
                factors[base].append(anchor)
    example = anchor.meta.get("example_value")
    with graph.inserting_after(anchor):
        clock = graph.placeholder(CLOCK)
    clock.meta.update(anchor.meta, fora_cache=CLOCK,
                      example_value=_like(example, (2,), torch.float32))
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        now = graph.call_function(tick_refresh if refresh else tick_reuse, (clock,))
    now.meta["example_value"] = clock.meta["example_value"]
    done = 0
    if refresh:
        for store in list(graph.find_nodes(op="call_function", target=STORE)):
            buffer, value = store.args
            chain = factors[buffer.name]  # type: ignore[union-attr]
            dtype = chain[0].meta["example_value"].dtype  # the output's: every factor's
            new, stores = value, []
            for j in range(1, order + 1):
                with graph.inserting_before(store):
                    new = graph.call_function(taylor_difference, (new, chain[j - 1], clock, j))
                    cast = graph.call_method("to", (new, dtype))
                new.meta.update(store.meta, example_value=_like(
                    value.meta.get("example_value"), chain[0].meta["example_value"].shape,
                    _compute(dtype)))
                cast.meta.update(store.meta, example_value=chain[0].meta["example_value"])
                stores.append((chain[j], cast))
            anchor = store
            for buf, val in stores:
                with graph.inserting_after(anchor):
                    anchor = graph.call_function(STORE, (buf, val))
                anchor.meta.update(store.meta)
            done += 1
    else:
        for load in list(graph.find_nodes(op="call_function", target=LOAD)):
            with graph.inserting_before(load):
                value = graph.call_function(taylor_forecast,
                                            (now, *factors[load.args[0].name]))  # type: ignore
            value.meta.update(load.meta)
            load.replace_all_uses_with(value)
            graph.erase_node(load)
            done += 1
    with graph.inserting_before(graph.output_node()):
        graph.call_function(STORE, (clock, now)).meta["fora_site"] = CLOCK
    graph.lint()
    gm.recompile()
    return done
