"""ForaConfig(forecast="taylor"): reuse steps return a Taylor forecast computed inside the
compiled reuse graph. Differential: against an independent eager reference of the formula
(tests/reference.py's EagerTaylor, host-side step arithmetic in float64) and against
diffusers' TaylorSeer hooks where the two coincide; and structural: no recompile, no
device->host read, no input beyond the model's own and the cache buffers."""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
import toy
from fakepipe import Pipe
from fora_fx.passes import GraphInvariantError, locate, rewrite
from reference import EagerFora, EagerTaylor
from test_piecewise import PIECES, SITES, _Broken
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from zoo import CASES, make, output_tensor, run_steps

import fora_fx

STEPS = 10


def _reference(case, order, steps=STEPS, seed=1, **kwargs):
    ref = EagerTaylor(case.model, case.sites, interval=3, order=order, **kwargs)
    try:
        return run_steps(ref, case, steps, seed), list(ref.refreshed)
    finally:
        ref.remove()


def _close(got, expected):
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"call {k}")


@pytest.mark.shares_captures
@pytest.mark.parametrize(
    "name, compiler, order",  # order 2 takes every step order 1 takes, and one more
    [(n, "eager", 2) for n in sorted(CASES)]
    + [("dit", "eager", 1), ("dit", "aot_eager", 2), ("sd3", "inductor", 1)],
)
def test_matches_the_eager_taylor_reference_over_two_generations(name, compiler, order):
    case = make(name)
    fast = fora_fx.transform(case.model, interval=3, compiler=compiler, forecast="taylor",
                             order=order)
    got = run_steps(fast, case, STEPS, 1)
    fora_fx.reset(fast)  # a new generation starts cold: no factor of the first survives
    got += run_steps(fast, case, STEPS, 1)
    expected, decisions = _reference(case, order)
    _close(got, expected * 2)
    assert fora_fx.stats(fast).history == decisions * 2
    # The forecast is not a replay: from the second full step on, reuse steps differ (this
    # check can fail), and before it they equal FORA's (one factor only).
    fora = EagerFora(case.model, case.sites, interval=3)
    replayed = run_steps(fora, case, STEPS, 1)
    fora.remove()
    torch.testing.assert_close(got[1], replayed[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[4], replayed[4], rtol=1e-4, atol=1e-4)


def test_interval_1_equals_the_original_model():
    case = make("pixart")
    expected = run_steps(case.model, case, 4, 3)
    fast = fora_fx.transform(case.model, interval=1, compiler="eager", forecast="taylor",
                             order=2)
    for g, e in zip(run_steps(fast, case, 4, 3), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_schedule_sets_the_gaps_of_the_divided_differences():
    case = make("dit")
    full = (0, 1, 2, 5, 6, 9)  # gaps 1, 1, 3, 1, 3: a wrong gap changes every forecast
    fast = fora_fx.transform(case.model, compiler="eager", forecast="taylor", order=2,
                             schedule=fora_fx.Schedule({STEPS: full}), num_steps=STEPS)
    expected, decisions = _reference(case, 2, full_steps=full)
    _close(run_steps(fast, case, STEPS, 1), expected)
    assert [k for k, r in enumerate(decisions) if r] == list(full)


def test_matches_diffusers_taylorseer_hooks_with_the_same_full_steps():
    """diffusers' TaylorSeerCacheConfig (diffusers/hooks/taylorseer_cache.py) forecasts the
    same polynomial from the same divided differences. Where they coincide: float32 factors
    (its default is bfloat16), and its full steps, which are steps < disable_cache_before_step
    and every cache_interval-th step after it (step `before + 1 + k * interval`, so step
    `before` itself is forecast) with no forced last step, given here as a Schedule. Where
    they do not: its schedule rule and the bfloat16 default; it counts each hooked module's
    own calls as steps (one generation per `reset_stateful_hooks`)."""
    diffusers_hooks = pytest.importorskip("diffusers.hooks")
    if not hasattr(diffusers_hooks, "TaylorSeerCacheConfig"):
        pytest.skip("this diffusers has no TaylorSeer cache")
    before, interval, order = 2, 3, 2
    full = [s for s in range(STEPS) if s < before or (s - before - 1) % interval == 0]
    case = make("dit")
    fast = fora_fx.transform(case.model, compiler="eager", forecast="taylor", order=order,
                             schedule=fora_fx.Schedule({STEPS: full}), num_steps=STEPS)
    got = run_steps(fast, case, STEPS, 1)
    fora_fx.restore(fast)

    diffusers_hooks.apply_taylorseer_cache(case.model, diffusers_hooks.TaylorSeerCacheConfig(
        cache_interval=interval, disable_cache_before_step=before, max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[re.escape(p) for p in case.sites]))
    from diffusers.models.cache_utils import CacheMixin

    try:  # its hooks keep state per named call; DiT lacks CacheMixin: applied unbound
        with torch.no_grad(), CacheMixin.cache_context(case.model, "cond"):
            expected = run_steps(case.model, case, STEPS, 1)
    finally:
        from diffusers.hooks import HookRegistry

        for path in case.sites:
            HookRegistry.check_if_exists_or_initialize(
                case.model.get_submodule(path)).remove_hook("taylorseer_cache", recurse=False)
    _close(got, expected)
    plain = run_steps(case.model, case, STEPS, 1)
    assert not torch.allclose(plain[before], got[before])  # step `before` was forecast


def test_no_recompile_no_host_read_and_no_input_but_the_buffers():
    case = make("dit")
    fast = fora_fx.transform(case.model, interval=3, compiler="aot_eager", forecast="taylor",
                             order=2)
    run_steps(fast, case, STEPS, 1)  # compiles
    fora_fx.reset(fast)
    graphs = counters["stats"]["unique_graphs"]
    reads = []

    class HostReads(TorchDispatchMode):
        """Every op that brings a device value to the host (.item(), bool(t), .tolist())."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._local_scalar_dense.default,
                        torch.ops.aten.item.default):
                reads.append(func)
            return func(*args, **(kwargs or {}))

    pair = fast._fora.pairs[0]  # a compiled pair's own data: what its variants are given
    given = []

    def recording(run):
        def recorded(*inputs):
            given.append(inputs)
            with HostReads():  # aot_eager runs the aten graph Inductor would compile
                return run(*inputs)
        return recorded

    pair.refresh, pair.reuse = recording(pair.refresh), recording(pair.reuse)

    got = []
    for k in range(STEPS):
        args, kwargs = case.inputs(k, 1)
        # Step 0 enters Dynamo's frame (its guards run: a new generation), which refuses to
        # run under a dispatch mode; later steps skip it, so the mode sees the whole call.
        with HostReads() if k else contextlib.nullcontext(), torch.no_grad():
            got.append(output_tensor(fast(*args, **kwargs)))
    assert reads == []
    assert counters["stats"]["unique_graphs"] == graphs  # the second generation compiled nothing
    assert fora_fx.stats(fast).direct >= STEPS - 1  # and skipped Dynamo's frame
    # Each step passes the model's inputs, then the same cache buffers, clock included: no
    # tensor made per step (a host-made step value would be a CPU input under CUDA graphs).
    buffers = fast._fora.branches["default"].buffers[pair]
    assert len(given) == STEPS
    for inputs in given:
        tail = inputs[len(inputs) - len(buffers) - len(pair.stack_groups["reuse"]):]
        assert all(t is b for t, b in zip(tail, buffers, strict=False))
    assert buffers[pair.clock].tolist() == [0.0, 4.0]  # full steps 0, 3, 6, 9; the last now
    assert pair.specs[pair.clock].dtype == torch.float32
    expected, _ = _reference(case, 2)
    _close(got, expected)


def test_factors_take_the_outputs_dtype_and_the_bytes_grow_with_the_order():
    sizes = {}
    for order in (0, 1, 2):
        case = make("pixart")
        options = {"forecast": "taylor", "order": order} if order else {}
        fast = fora_fx.transform(case.model, interval=3, compiler="eager", **options)
        run_steps(fast, case, 2, 1)
        sizes[order] = fora_fx.stats(fast).cache_bytes
        pair = fast._fora.pairs[0]
        factors = [s for i, s in enumerate(pair.specs) if i != pair.clock]
        assert len(factors) == (order + 1) * sum(len(s.outputs) for s in pair.sites)
        assert {s.dtype for s in factors} == {torch.float32}
        assert ("forecast: taylor" in str(fora_fx.explain(fast))) == bool(order)
    clock = 2 * 4  # two float32
    assert sizes[1] == 2 * sizes[0] + clock
    assert sizes[2] == 3 * sizes[0] + clock


def test_bfloat16_outputs_keep_bfloat16_factors_and_follow_the_reference():
    case = make("dit")
    case.model.to(torch.bfloat16)
    fast = fora_fx.transform(case.model, interval=3, compiler="eager", forecast="taylor")

    def steps(model):
        outs = []
        for k in range(7):
            args, kwargs = case.inputs(k, 1)
            args, kwargs = tree_map(
                lambda a: a.to(torch.bfloat16) if isinstance(a, torch.Tensor)
                and a.is_floating_point() else a, (args, kwargs))
            with torch.no_grad():
                outs.append(output_tensor(model(*args, **kwargs)).float())
        return outs

    got = steps(fast)
    pair = fast._fora.pairs[0]
    assert {s.dtype for i, s in enumerate(pair.specs) if i != pair.clock} == {torch.bfloat16}
    ref = EagerTaylor(case.model, case.sites, interval=3, order=1)
    expected = steps(ref)
    ref.remove()
    # the reference keeps float64 factors: bfloat16 storage costs a few units in its last place
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0.05, atol=0.05)


def _toy_taylor(ts, order=1):
    """One branch's outputs over one generation of the toy under a Taylor forecast, by
    hand: the toy's attention returns t and its MLP t + t * t at a full step."""
    out, hist = [], []
    last = None
    for k, t in enumerate(ts):
        if k % 3 == 0 or k == len(ts) - 1:
            out.append(toy.recomputed(t))
            hist.append((k, [[t], [t + t * t]]))
            if len(hist) > 1:
                (k0, prev), (k1, new) = hist[-2], hist[-1]
                for site in range(2):
                    for j in range(order):
                        if j < len(prev[site]):
                            new[site].append((new[site][j] - prev[site][j]) / (k1 - k0))
            last = hist[-1]
        else:
            d = k - last[0]
            a, m = (sum(f * d ** j / [1, 1, 2][j] for j, f in enumerate(fs)) for fs in last[1])
            out.append(t + t * a + m)
    return out


def test_guidance_branches_forecast_from_their_own_factors():
    pipe = fora_fx.transform(Pipe(), interval=3, compiler="eager", forecast="taylor")
    ts = [1, 2, 3, 4, 5, 6, 7]
    second = [10 * t for t in ts]
    out = pipe(ts, second=second)
    assert [o[0] for o in out] == pytest.approx(_toy_taylor(ts), rel=1e-12)
    assert [o[1] for o in out] == pytest.approx(_toy_taylor(second), rel=1e-12)
    assert _toy_taylor(ts)[4] != toy.reused(5, 4)  # a forecast, not FORA's replay
    out = pipe(ts, second=second)  # the next pipeline call starts cold
    assert [o[0] for o in out] == pytest.approx(_toy_taylor(ts), rel=1e-12)


def test_torch_compile_by_name_forecasts_too():
    model = torch.compile(toy.Toy(), backend="fora", fullgraph=True, options={
        "compiler": "eager", "forecast": "taylor", "num_steps": 7})
    ts = [1, 2, 3, 4, 5, 6, 7]
    for _ in range(2):  # counted steps wrap after num_steps: the second generation is cold
        got = [model(*toy.inputs(t)).item() for t in ts]
        assert got == pytest.approx(_toy_taylor(ts), rel=1e-12)


def test_a_diffusers_pipeline_forecasts_like_the_reference():
    import pipes

    case = pipes.make_pipe("dit")  # DDIM (steps counted), batched guidance: one call a step
    ref = EagerTaylor(case.pipe.transformer, case.sites, interval=3, order=2,
                      num_steps=pipes.STEPS)
    with torch.no_grad():
        expected = [pipes.output_tensor(case.pipe(**case.call(s))) for s in (0, 1)]
    ref.remove()
    pipe = fora_fx.transform(case.pipe, interval=3, compiler="eager", forecast="taylor",
                             order=2)
    got = [pipes.output_tensor(pipe(**case.call(s))) for s in (0, 1)]  # two generations
    _close(got, expected)
    assert fora_fx.stats(pipe).history == [True, False, False, True, False, False, True,
                                           True] * 2


def test_piecewise_graphs_forecast_each_from_its_own_clock():
    torch.manual_seed(0)
    model = _Broken(break_inside=True).eval()
    x, steps = torch.randn(2, 4, 16), [torch.full((2,), 900.0 - 90 * k) for k in range(7)]
    ref = EagerTaylor(model, SITES, interval=3, order=2, num_steps=7)
    with torch.no_grad():
        expected = [ref(x, t) for t in steps]
    ref.remove()
    fast = fora_fx.transform(model, interval=3, num_steps=7, compiler="eager",
                             piecewise=PIECES, forecast="taylor", order=2)
    try:
        for _ in range(2):  # two generations: the second starts cold
            _close([fast(x, t) for t in steps], expected)
    finally:
        torch._dynamo.reset()  # leave no skipped frame for other tests (see test_piecewise)


def test_lora_adapted_models_forecast_like_the_reference():
    from test_lora import _adapt

    case = make("flux")
    torch.manual_seed(3)
    _adapt(case.model)  # a rank-2 LoRA on every Linear, its B not zero
    expected, _ = _reference(case, 2)
    fast = fora_fx.transform(case.model, interval=3, compiler="eager", forecast="taylor",
                             order=2)
    _close(run_steps(fast, case, STEPS, 1), expected)
    assert fora_fx.stats(fast).reuses == 6


def test_a_graph_reading_a_factor_after_writing_it_is_refused():
    from fora_fx.passes import verify

    from fora_fx.capture import capture, module_paths

    case = make("dit")
    args, kwargs = case.inputs(0, 0)
    gm, _ = capture(case.model, *args, **kwargs)
    sites = locate(gm, module_paths(case.model)).sites
    variant = rewrite(gm, sites, True, order=1, lower=False).graph  # checked inside: valid
    store = next(n for n in variant.graph.nodes if n.target is torch.ops.fora.store.default)
    reader = next(u for u in store.args[0].users if u is not store)
    reader.prepend(store)  # the store moved before the read of the previous factor
    with pytest.raises(GraphInvariantError, match="after"):
        verify(gm, variant, sites, True, 1)


def test_config_refuses_what_cannot_apply():
    with pytest.raises(ValueError, match="forecast must be one of"):
        fora_fx.ForaConfig(forecast="foca")
    with pytest.raises(ValueError, match="needs forecast='taylor'"):
        fora_fx.ForaConfig(order=2)
    with pytest.raises(ValueError, match=r"1 \.\. 4"):
        fora_fx.ForaConfig(forecast="taylor", order=5)
    with pytest.raises(TypeError, match="order must be an int"):
        fora_fx.ForaConfig(forecast="taylor", order=1.5)
    with pytest.raises(ValueError, match="hook sites"):
        fora_fx.ForaConfig(forecast="taylor", piecewise=fora_fx.Piecewise(hook_sites=("*.ff",)))


def test_docs_example_runs():
    """docs/forecast.md's example, exec'd verbatim (the default Inductor compiler)."""
    import pathlib

    docs = pathlib.Path(__file__).resolve().parent.parent / "docs" / "forecast.md"
    block = re.search(r"exec'd verbatim.*?\n```python\n(.*?)```", docs.read_text(), re.S)
    assert block is not None, "docs/forecast.md lost its tested example"
    scope: dict = {}
    exec(block.group(1), scope)  # noqa: S102 - the documented user code is what is tested
    stats = scope["stats"]
    assert stats.history == [True, False, False, True, False, False, True, False, False, True]
    assert stats.direct >= 7  # continuing calls skipped Dynamo's frame
