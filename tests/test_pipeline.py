"""The rewrite is a pipeline of passes with the graph checker after every one (the graphs
that are compiled included), and a counter per pass that explain reports."""

from __future__ import annotations

import pytest
import torch
from fora_fx.passes import GraphInvariantError, locate, pipeline, rewrite
from zoo import make, run_steps

import fora_fx
from fora_fx import ops
from fora_fx.capture import capture, module_paths


def _dit():
    case = make("dit")
    args, kwargs = case.inputs(0, 0)
    gm, _ = capture(case.model, *args, **kwargs)
    return case, gm, locate(gm, module_paths(case.model)).sites


def test_every_pass_is_counted_and_explained():
    case, _, sites = _dit()
    outputs = sum(len(s.outputs) for s in sites)
    fast = fora_fx.transform(case.model, interval=2)  # Inductor: the lowering passes run
    run_steps(fast, case, 2, seed=0)
    ex = fora_fx.explain(fast)
    assert list(ex.passes["refresh"]) == ["specialize", "batch", "lower_stores"]
    assert list(ex.passes["reuse"]) == ["specialize", "prune", "batch", "elide_loads"]
    assert ex.passes["refresh"]["specialize"] == ex.passes["refresh"]["lower_stores"] == outputs
    assert ex.passes["reuse"]["elide_loads"] == outputs  # no load reaches the output
    assert ex.passes["reuse"]["prune"] == ex.pruned == 2
    assert ex.passes["reuse"]["batch"] == len(ex.batched["reuse"]) == 1
    assert "reuse passes: specialize 4, prune 2, batch 1, elide_loads 4" in str(ex)


def test_the_compiled_graphs_keep_the_invariants():
    _, gm, sites = _dit()
    for refresh in (True, False):
        variant = rewrite(gm, sites, refresh)  # lowered, as compiled; checked inside
        copies = [n for n in variant.graph.graph.nodes
                  if n.target is torch.ops.aten.copy_.default]
        assert len(copies) == (len(sites) if refresh else 0)
        assert not any(n.target in (ops.STORE, ops.LOAD) for n in variant.graph.graph.nodes)
        readable = {n.target for n in variant.readable.graph.nodes}
        assert (ops.STORE if refresh else ops.LOAD) in readable  # explain's view: before


@pytest.mark.parametrize("refresh", [True, False])
def test_a_pass_that_breaks_an_invariant_is_caught_after_it(refresh, monkeypatch):
    _, gm, sites = _dit()
    original = pipeline.passes

    def with_a_bad_lowering(*args, **kwargs):
        steps = original(*args, **kwargs)

        def drop_a_store_or_write_a_buffer(g):
            buffers = [n for n in g.graph.find_nodes(op="placeholder") if "fora_cache" in n.meta]
            if refresh:  # a lowered store lost: its buffer would serve a stale value
                copy = next(n for n in g.graph.nodes
                            if n.target is torch.ops.aten.copy_.default)
                g.graph.erase_node(copy)
            else:  # a reuse graph writing its cache
                out = next(iter(buffers[0].users))
                with g.graph.inserting_after(out):
                    g.graph.call_function(torch.ops.aten.copy_.default, (buffers[0], out))
            g.recompile()
            return 1

        return [*steps, ("bad", drop_a_store_or_write_a_buffer)]

    monkeypatch.setattr(pipeline, "passes", with_a_bad_lowering)
    with pytest.raises(GraphInvariantError, match="buffers written" if refresh else "stores"):
        rewrite(gm, sites, refresh)
