"""Real compiles: Inductor (C++ on CPU), compile counts, recompiles, the "fora" backend by
name. Kept few: each Inductor compile costs seconds on 2 cores."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import toy
from reference import EagerFora
from torch._dynamo.utils import counters
from zoo import make, output_tensor

import fora_fx


def _aot_compiles() -> int:
    return counters["aot_autograd"]["total"]


def test_inductor_two_generations_one_pair_no_recompile():
    case = make("timm")
    fast = fora_fx.transform(case.model, interval=3, num_steps=10, compiler="inductor")
    counters.clear()
    outs = []
    for _ in range(2):  # two generations of 10 steps; num_steps wraps the counter
        for k in range(10):
            args, kwargs = case.inputs(k, 0)
            outs.append(output_tensor(fast(*args, **kwargs)))
    assert fora_fx.stats(fast).graphs == 1  # one captured graph -> one refresh/reuse pair
    assert _aot_compiles() == 2  # exactly the two variants went through AOT + Inductor
    assert counters["stats"]["unique_graphs"] == 1  # Dynamo never recompiled
    assert not counters["graph_break"]
    expected_pattern = [True, False, False, True, False, False, True, False, False, True]
    assert fora_fx.stats(fast).history == expected_pattern * 2

    ref = EagerFora(case.model, case.sites, interval=3, num_steps=10)
    expected = []
    for _ in range(2):
        for k in range(10):
            args, kwargs = case.inputs(k, 0)
            expected.append(output_tensor(ref(*args, **kwargs)))
    ref.remove()
    for e, o in zip(expected, outs, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-5)


def test_inductor_toy_exact_and_reset():
    fast = fora_fx.transform(toy.Toy(), interval=2, compiler="inductor")
    got = [fast(*toy.inputs(t)).item() for t in (1, 2, 3)]
    assert got == [toy.recomputed(1), toy.reused(2, 1), toy.recomputed(3)]
    fora_fx.reset(fast)
    assert fast(*toy.inputs(5)).item() == toy.recomputed(5)


def test_backend_by_name_with_options_and_reset():
    model = toy.Toy()
    compiled = torch.compile(model, backend="fora", options={"interval": 3, "compiler": "eager"})
    got = [compiled(*toy.inputs(t)).item() for t in (1, 2)]
    assert got == [toy.recomputed(1), toy.reused(2, 1)]
    fora_fx.reset(compiled)  # finds the runtime through the model's parameters
    assert compiled(*toy.inputs(3)).item() == toy.recomputed(3)
    assert fora_fx.explain(compiled).sites[0].module_path == "attn"


def test_backend_object_for_a_config():
    cfg = fora_fx.ForaConfig(interval=2, compiler="eager")
    compiled = torch.compile(toy.Toy(), backend=fora_fx.backend(cfg), fullgraph=True)
    got = [compiled(*toy.inputs(t)).item() for t in (1, 2, 3)]
    assert got == [toy.recomputed(1), toy.reused(2, 1), toy.recomputed(3)]


class Breaks(toy.Toy):
    def forward(self, x, t):
        y = super().forward(x, t)
        torch._dynamo.graph_break()
        return y + 1


def test_graph_break_is_a_clear_error():
    compiled = torch.compile(Breaks(), backend="fora", options={"compiler": "eager"})
    with pytest.raises(Exception, match="fora needs the whole forward as one graph"):
        compiled(*toy.inputs(1))


def test_graph_break_under_transform_names_the_model_and_keeps_dynamos_error():
    fast = fora_fx.transform(Breaks(), compiler="eager")
    with pytest.raises(RuntimeError, match="whole forward of Breaks as one graph") as info:
        fast(*toy.inputs(1))
    assert isinstance(info.value.__cause__, torch._dynamo.exc.Unsupported)


class BreaksSometimes(toy.Toy):
    def forward(self, x, t, brk=False):
        y = super().forward(x, t)
        if brk:
            torch._dynamo.graph_break()
        return y


def test_graph_break_after_the_recompile_limit_is_the_same_clear_error():
    # The break is met on the retry with a raised limit (every diffusers model shares one
    # peft `wrapper` frame, which fills the limit in a process with many models).
    fast = fora_fx.transform(BreaksSometimes(), compiler="eager")
    fast(*toy.inputs(1))
    fora_fx.reset(fast)
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.raises(RuntimeError, match="whole forward of BreaksSometimes") as info:
            fast(*toy.inputs(1), brk=True)
    assert isinstance(info.value.__cause__, torch._dynamo.exc.Unsupported)


_FRESH = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    import toy
    {pre}
    m = torch.compile(toy.Toy(), backend="fora", options={{"interval": 2, "compiler": "eager"}})
    vals = [m(*toy.inputs(t)).item() for t in (1, 2)]
    assert vals == [toy.recomputed(1), toy.reused(2, 1)], vals
    assert "fora_fx" in sys.modules
    {post}
    print("OK")
    """
)


@pytest.mark.parametrize(
    "pre, post",
    [
        ("", ""),  # resolved through the torch_dynamo_backends entry point alone
        ("import fora_fx", ""),  # imported first: no 'duplicate name: fora'
        # entry point first, then an import and a second compile by name
        ("", "import fora_fx; torch.compile(toy.Toy(), backend='fora', "
             "options={'compiler': 'eager'})(*toy.inputs(1))"),
    ],
)
def test_backend_resolves_in_a_fresh_interpreter(pre, post):
    import os

    code = _FRESH.format(tests=os.path.dirname(__file__), pre=pre, post=post)
    if "fora_fx" not in pre:
        code = code.replace("import toy\n", "import toy\nassert 'fora_fx' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_parameters_and_cache_buffers_are_static_inputs():
    # CUDA graphs copy every non-static input on every replay: after
    # cloning and rewriting, AOTAutograd must still see weights and cache buffers as static.
    import os

    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import toy, fora_fx\n"
        "fast = fora_fx.transform(toy.Toy(), interval=2, compiler='inductor')\n"
        "fast(*toy.inputs(1)); fast(*toy.inputs(2))\n"
    )
    env = dict(os.environ, TORCH_LOGS="cudagraph_static_inputs")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    static = [ln for ln in proc.stderr.splitlines() if "Adding static input" in ln]
    non_static = [ln.rsplit("source ", 1)[1] for ln in proc.stderr.splitlines()
                  if "Non-static input" in ln]
    assert sorted(set(non_static)) == ["L['t']", "L['x']"]  # only the real model inputs
    for variant_lines in (static[: len(static) // 2], static[len(static) // 2 :]):
        sources = " ".join(variant_lines)
        assert "fora_cache_attn_0" in sources and "fora_cache_mlp_0" in sources
        assert sum("parameters" in ln for ln in variant_lines) == 4  # fc1/fc2 weight + bias


def test_mode_reaches_the_backend():
    compiled = torch.compile(toy.Toy(), backend="fora", mode="reduce-overhead")
    assert compiled(*toy.inputs(1)).item() == toy.recomputed(1)
    (runtime,) = fora_fx.api.runtimes(compiled)
    assert runtime.config.mode == "reduce-overhead" and runtime.config.compiler == "inductor"


def _last_op(g: torch.fx.Graph):
    return [n.target for n in g.nodes if n.op == "call_function"][-1]


def _graph_with_a_late_store(read_cache_too: bool = False) -> torch.fx.Graph:
    # The shape AOTAutograd gives a refresh graph: the store into the cache buffer (an input
    # written in place) comes at the end, after everything that follows the stored value.
    g = torch.fx.Graph()
    x, cache = g.placeholder("x"), g.placeholder("cache")
    value = g.call_function(torch.ops.aten.relu.default, (x,))
    y = g.call_function(torch.ops.aten.mul.Tensor, (value, 2.0))
    for _ in range(3):
        y = g.call_function(torch.ops.aten.sin.default, (y,))
    if read_cache_too:
        y = g.call_function(torch.ops.aten.add.Tensor, (y, cache))
    g.call_function(torch.ops.aten.copy_.default, (cache, value))
    g.output((y,))
    return g


def test_store_placement_moves_each_cache_store_next_to_its_value():
    from fora_fx.compile import StoresNearValues

    g = _graph_with_a_late_store()
    StoresNearValues([1])(g)
    order = [n.target for n in g.nodes if n.op == "call_function"]
    assert order[:3] == [torch.ops.aten.relu.default, torch.ops.aten.copy_.default,
                         torch.ops.aten.mul.Tensor]
    g.lint()
    StoresNearValues([0])(g2 := _graph_with_a_late_store())  # not a cache buffer: untouched
    assert _last_op(g2) == torch.ops.aten.copy_.default


def test_store_placement_leaves_a_store_whose_buffer_is_read():
    from fora_fx.compile import StoresNearValues

    g = _graph_with_a_late_store(read_cache_too=True)
    StoresNearValues([1])(g)  # moving it would change what the add reads
    assert _last_op(g) == torch.ops.aten.copy_.default


def test_store_placement_chains_after_a_configured_post_grad_pass():
    from fora_fx.compile import StoresNearValues, store_placement_patches

    seen = []
    patches = store_placement_patches([1])
    assert isinstance(patches["post_grad_custom_post_pass"], StoresNearValues)
    chained = StoresNearValues([1], then=seen.append)
    chained(g := _graph_with_a_late_store())
    assert seen == [g]
    assert store_placement_patches([]) == {}
    # Inductor caches a compiled graph under the passes' uuids: one that cannot name itself
    # (a plain function) makes the chain uncacheable, never cached under a wrong key
    assert chained.uuid() is None
    assert StoresNearValues([1]).uuid() != StoresNearValues([2]).uuid()
