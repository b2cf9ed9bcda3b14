"""Schedules (issue 18, part 2): explicit full steps per generation length, and
fora_fx.calibrate choosing them from one uncached measured generation."""

from __future__ import annotations

import copy
import importlib
import itertools
import math
import pathlib
import random
import re

import fakepipe
import pytest
import torch
import toy
from reference import EagerFora
from zoo import make, output_tensor, run_steps

import fora_fx
from fora_fx.schedule import choose

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "schedules.md"
EAGER = fora_fx.ForaConfig(compiler="eager")


class ScheduledFora(EagerFora):
    """The eager reference, refreshing on an explicit set of steps."""

    def __init__(self, model, site_paths, full, num_steps):
        super().__init__(model, site_paths, interval=1, num_steps=num_steps)
        self.full = set(full)

    def _before_call(self, module, args):
        super()._before_call(module, args)
        self.refresh = self.refreshed[-1] = self.step in self.full


def no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# -- Schedule and ForaConfig ---------------------------------------------------------------


@pytest.mark.parametrize("full, error", [
    ({10: (1, 4)}, r"step 0 must be a full step .*first step has no cache"),
    ({10: (0, 4, 4)}, r"step\(s\) \[4\] listed twice"),
    ({10: (0, 10)}, r"step\(s\) \[10\] outside a 10-step generation; valid steps are 0 .. 9"),
    ({10: (0, -1)}, r"outside a 10-step generation; valid steps are 0 .. 9"),
    ({0: (0,)}, r"generation length must be an int >= 1"),
    ({}, r"non-empty mapping of generation length -> full steps"),
    ({10: "0"}, r"sequence of ints, e.g. \(0, 3, 6\)"),
    ({10: (0, 2.0)}, r"full steps must be ints"),
])
def test_schedule_validation_says_what_is_valid(full, error):
    with pytest.raises((ValueError, TypeError), match=error):
        fora_fx.Schedule(full)


def test_schedule_is_data():
    s = fora_fx.Schedule({20: [19, 0, 4, 1, 9, 15], 8: (0, 5)})
    assert s.full == {8: (0, 5), 20: (0, 1, 4, 9, 15, 19)}  # sorted, by length
    assert str(s) == "8 steps -> full at 0, 5; 20 steps -> full at 0, 1, 4, 9, 15, 19"
    assert eval(repr(s), {"Schedule": fora_fx.Schedule}) == s
    assert fora_fx.Schedule.from_json(s.to_json()) == s
    # a calibrated curve round-trips too (NaN: a step nothing measured)
    c = fora_fx.Schedule({3: (0, 2)}, {3: (0.0, math.nan, 0.5)})
    back = fora_fx.Schedule.from_json(c.to_json())
    assert back.changes[3][2] == 0.5 and math.isnan(back.changes[3][1])
    assert "2* 0.5" in c.describe()
    # part of a frozen, hashable config (configs key the backend cache)
    assert hash(fora_fx.ForaConfig(schedule=s)) == hash(fora_fx.ForaConfig(schedule=back.__class__(
        {20: (0, 1, 4, 9, 15, 19), 8: (0, 5)})))
    with pytest.raises(ValueError, match=r"changes\[4\] must be 4 values"):
        fora_fx.Schedule({3: (0,)}, {4: (0.0,) * 4})


def test_config_refuses_interval_options_beside_a_schedule():
    s = fora_fx.Schedule({10: (0, 5)})
    for name, value in (("interval", 2), ("warmup_steps", 2), ("refresh_last", False)):
        with pytest.raises(ValueError, match=rf"{name}={value!r} cannot apply with a schedule"):
            fora_fx.ForaConfig(schedule=s, **{name: value})
    with pytest.raises(ValueError, match=r"num_steps=8, but the schedule has full steps for "
                                         r"generations of 10 steps only"):
        fora_fx.ForaConfig(schedule=s, num_steps=8)
    with pytest.raises(TypeError, match=r"fora_fx.Schedule"):
        fora_fx.ForaConfig(schedule={10: (0, 5)})
    fora_fx.ForaConfig(schedule=s, num_steps=10)  # the defaults are fine


def test_refreshes_follows_the_list_for_that_length():
    cfg = fora_fx.ForaConfig(schedule=fora_fx.Schedule({6: (0, 2, 3), 4: (0, 3)}))
    assert [cfg.refreshes(k, 6) for k in range(6)] == [True, False, True, True, False, False]
    assert [cfg.refreshes(k, 4) for k in range(4)] == [True, False, False, True]
    with pytest.raises(ValueError, match=r"generations of 4, 6 steps, not 5"):
        cfg.refreshes(0, 5)
    with pytest.raises(ValueError, match=r"generation length is unknown: pass "
                                         r"ForaConfig\(num_steps=...\)"):
        cfg.refreshes(0)
    assert fora_fx.ForaConfig(schedule=cfg.schedule, num_steps=4).refreshes(3)


# -- the runtime ----------------------------------------------------------------------------


def test_transformed_model_refreshes_on_the_listed_steps():
    case = make("dit")
    full = (0, 1, 3, 6)
    fast = fora_fx.transform(case.model, EAGER, schedule=fora_fx.Schedule({8: full}),
                             num_steps=8)
    got = run_steps(fast, case, 8, seed=1) + run_steps(fast, case, 8, seed=2)  # wraps at 8
    ref = ScheduledFora(case.model, case.sites, full, num_steps=8)
    expected = run_steps(ref, case, 8, seed=1) + run_steps(ref, case, 8, seed=2)
    ref.remove()
    listed = [k in full for k in range(8)]
    assert fora_fx.stats(fast).history == ref.refreshed == listed * 2
    for k, (e, g) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    # reuse steps really replay (the check can fail): the uncached model differs at step 2
    plain = run_steps(case.model, case, 3, seed=1)
    assert not torch.allclose(plain[2], got[2])
    assert "schedule: 8 steps -> full at 0, 1, 3, 6" in str(fora_fx.explain(fast))
    assert "schedule=Schedule({8: (0, 1, 3, 6)})" in repr(fast)


def test_schedules_share_the_compiled_graphs_and_keep_their_own_steps(monkeypatch):
    # The graphs do not depend on when a model refreshes: models that differ only in their
    # schedule (interval, warm-up, length, Schedule) are captured and compiled once. Live at
    # once and called in turns, each still follows its own steps.
    backend = importlib.import_module("fora_fx.backend")
    builds = []
    build_pair = backend.build_pair
    monkeypatch.setattr(backend, "build_pair",
                        lambda *a, **k: builds.append(1) or build_pair(*a, **k))
    torch._dynamo.reset()
    cases = [make("dit") for _ in range(4)]
    plain = copy.deepcopy(cases[0].model)
    refs = [EagerFora(copy.deepcopy(cases[1].model), cases[1].sites, interval=3,
                      warmup_steps=2),
            ScheduledFora(copy.deepcopy(cases[2].model), cases[2].sites, (0, 3), num_steps=5)]
    configs = [dict(interval=1), dict(interval=3, warmup_steps=2),
               dict(schedule=fora_fx.Schedule({5: (0, 3)}), num_steps=5),
               dict(interval=2, forecast="taylor")]
    fasts = [fora_fx.transform(c.model, EAGER, **cfg)
             for c, cfg in zip(cases, configs, strict=True)]

    def call(model, case, k):
        args, kwargs = case.inputs(k, 3)
        with torch.no_grad():
            return output_tensor(model(*args, **kwargs))

    for k in range(5):
        torch.testing.assert_close(call(fasts[0], cases[0], k), call(plain, cases[0], k),
                                   rtol=0, atol=0)
        for fast, ref, case in zip(fasts[1:3], refs, cases[1:3], strict=True):
            torch.testing.assert_close(call(fast, case, k), call(ref, case, k),
                                       rtol=1e-5, atol=1e-6, msg=f"step {k}")
        call(fasts[3], cases[3], k)
    assert len(builds) == 2  # one capture for the three replays, one for the forecast
    assert [fora_fx.stats(f).history for f in fasts[:3]] == [
        [True] * 5, [True, True, False, True, False], [True, False, False, True, False]]
    assert [r.refreshed for r in refs] == [fora_fx.stats(f).history for f in fasts[1:3]]


def test_model_without_a_generation_length_is_refused_at_its_first_call():
    fast = fora_fx.transform(toy.Toy(), EAGER, schedule=fora_fx.Schedule({4: (0, 2)}))
    with pytest.raises(ValueError, match=r"generation length is unknown"):
        fast(*toy.inputs(1.0))


def test_backend_by_name_takes_a_schedule():
    model = toy.Toy()
    options = {"schedule": fora_fx.Schedule({4: (0, 2)}), "num_steps": 4, "compiler": "eager"}
    compiled = torch.compile(model, backend="fora", options=options)
    out = [compiled(*toy.inputs(t)).item() for t in (1.0, 2.0, 3.0, 4.0)]
    assert out == [toy.recomputed(1), toy.reused(2, 1), toy.recomputed(3), toy.reused(4, 3)]
    assert fora_fx.stats(compiled).history == [True, False, True, False]


def test_pipeline_uses_the_schedulers_length():
    pipe = fakepipe.Pipe()
    s = fora_fx.Schedule({5: (0, 3), 4: (0, 1)})
    fora_fx.transform(pipe, EAGER, schedule=s)
    ts = [1.0, 2.0, 3.0, 4.0, 5.0]
    out = [a for (a,) in pipe(ts)]
    assert out == [toy.recomputed(1), toy.reused(2, 1), toy.reused(3, 1),
                   toy.recomputed(4), toy.reused(5, 4)]
    assert pipe(ts[:4]) == [(toy.recomputed(1),), (toy.recomputed(2),), (toy.reused(3, 2),),
                            (toy.reused(4, 2),)]
    assert fora_fx.stats(pipe).history == [True, False, False, True, False,
                                           True, True, False, False]
    with pytest.raises(ValueError, match=r"generations of 4, 5 steps, not 3"):
        pipe(ts[:3])
    assert [a for (a,) in pipe(ts)] == out  # a refused generation leaves nothing behind


# -- choosing steps -------------------------------------------------------------------------


def _cost(d, full):
    cost, last = 0.0, 0
    for k in range(1, len(d)):
        if k in full:
            last = k
        else:
            cost += sum(d[last + 1:k + 1])
    return cost


def test_choose_is_optimal_for_a_budget_of_steps():
    rng = random.Random(0)
    for _ in range(20):
        d = [0.0] + [rng.random() ** 3 for _ in range(8)]
        for k in (1, 2, 3, 5, 9):
            full = choose(d, k)
            assert len(full) == k and full[0] == 0 and list(full) == sorted(set(full))
            best = min(_cost(d, (0, *c)) for c in itertools.combinations(range(1, 9), k - 1))
            assert _cost(d, full) == pytest.approx(best)


def _within(d, full, bound):
    return all(sum(d[max(j for j in full if j <= k) + 1:k + 1]) <= bound for k in range(len(d)))


def test_choose_an_error_bound_takes_the_fewest_steps():
    rng = random.Random(1)
    for _ in range(20):
        d = [0.0] + [rng.random() for _ in range(8)]
        full = choose(d, 0.9)
        assert full[0] == 0 and _within(d, full, 0.9)
        fewer = [c for c in itertools.combinations(range(1, 9), len(full) - 2)
                 if _within(d, (0, *c), 0.9)]
        assert not fewer


def test_choose_refuses_budgets_it_cannot_meet():
    with pytest.raises(ValueError, match=r"valid budgets are 1 .. 4"):
        choose([0.0, 1, 1, 1], 5)
    with pytest.raises(ValueError, match=r"valid budgets are 2 .. 4 \(steps \[0, 2\] must"):
        choose([0.0, 1, math.nan, 1], 1)
    with pytest.raises(ValueError, match=r"finite float > 0"):
        choose([0.0, 1], -0.5)
    assert choose([0.0, 0.1, math.nan, 0.1], 2) == (0, 2)  # unmeasured: full
    with pytest.raises(TypeError, match=r"budget must be an int"):
        fora_fx.calibrate(toy.Toy(), lambda m: None, budget=True)


# -- calibrate ------------------------------------------------------------------------------


def _toy_run(ts, second=None):
    def run(model):
        for t in ts:
            model(*toy.inputs(t))
    return run


def test_calibrate_picks_the_steps_where_the_sites_change():
    # The toy's sites output t and t + t*t: constant except jumps at steps 3 and 7.
    ts = [1.0] * 3 + [2.0] * 4 + [3.0] * 3
    model = toy.Toy()
    s = fora_fx.calibrate(model, _toy_run(ts), budget=3, config=EAGER)
    assert s.full == {10: (0, 3, 7)}  # a uniform schedule of 3 steps would be (0, 4, 8)
    assert s.changes[10][3] > 1.0 and s.changes[10][4] == 0.0
    assert fora_fx.calibrate(model, _toy_run(ts), budget=0.5, config=EAGER).full == {10: (0, 3, 7)}
    # the choice follows the curve: move the jump, the step moves
    ts = [1.0] * 5 + [2.0] * 5
    assert fora_fx.calibrate(model, _toy_run(ts), budget=2, config=EAGER).full == {10: (0, 5)}
    assert no_hooks(model)


def test_calibrate_restores_a_piecewise_model():
    ts = [1.0] * 3 + [2.0] * 4 + [3.0] * 3
    model = toy.Toy()
    # attn excluded: only the hook site (outside the graph) is measured
    cfg = EAGER.replace(piecewise=fora_fx.Piecewise(hook_sites=("mlp",)), exclude=("attn",))
    assert fora_fx.calibrate(model, _toy_run(ts), budget=3, config=cfg).full == {10: (0, 3, 7)}
    assert "forward" not in vars(model.mlp) and no_hooks(model)  # the hook site unwrapped


def test_calibrate_a_zoo_model():
    case = make("dit")
    model = case.model
    runs = []

    def run(m):
        runs.append(type(m))
        return run_steps(m, case, 8, seed=3)

    s = fora_fx.calibrate(model, run, budget=3, config=EAGER)
    full = s.full[8]
    assert len(full) == 3 and full[0] == 0 and list(s.full) == [8]
    assert len(s.changes[8]) == 8 and all(c > 0 for c in s.changes[8][1:])
    assert runs == [type(model)] * 2  # stopped at its first call, then one whole run
    # nothing left behind: no hooks, not transformed, the same outputs as before
    assert no_hooks(model) and getattr(model, "_fora", None) is None
    again = fora_fx.calibrate(model, run, budget=3, config=EAGER)
    assert again == s and again.changes == s.changes  # deterministic
    bound = fora_fx.calibrate(model, run, budget=sum(s.changes[8]) / 4, config=EAGER)
    assert 2 <= len(bound.full[8]) <= 7 and bound.full[8][0] == 0
    # and it is usable in one line
    fast = fora_fx.transform(model, EAGER, schedule=s, num_steps=8)
    run_steps(fast, case, 8, seed=3)
    assert fora_fx.stats(fast).history == [k in full for k in range(8)]


def test_calibrate_a_pipeline_numbers_steps_by_its_scheduler():
    # two calls per step (branches call0 / call1): each compared with itself; the second
    # branch jumps at step 4 only, the first never changes
    pipe = fakepipe.Pipe()
    ts = [1.0] * 6
    second = [5.0] * 4 + [9.0] * 2
    s = fora_fx.calibrate(pipe, lambda p: p(ts, second=second), budget=2, config=EAGER)
    assert s.full == {6: (0, 4)}
    assert isinstance(pipe.transformer, toy.Toy) and no_hooks(pipe.transformer)
    assert s.changes[6][4] > 0 and s.changes[6][1] == s.changes[6][5] == 0.0
    fora_fx.transform(pipe, EAGER, schedule=s)
    pipe(ts, second=second)
    assert fora_fx.stats(pipe).history == [k in (0, 4) for k in range(6) for _ in range(2)]
    fora_fx.restore(pipe)
    with pytest.raises(TypeError, match=r"measures the untransformed model"):
        fora_fx.calibrate(fora_fx.transform(toy.Toy(), EAGER), _toy_run(ts), budget=2)


def test_calibrate_two_experts_full_where_the_second_starts():
    # Wan 2.2: transformer_2 from step 3 on; its sites have no previous output at step 3
    # (NaN: unmeasured), and the runtime recomputes there anyway: a forced full step.
    pipe = fakepipe.Pipe(boundary=3)
    s = fora_fx.calibrate(pipe, lambda p: p([1.0] * 6), budget=2, config=EAGER)
    assert s.full == {6: (0, 3)} and math.isnan(s.changes[6][3])
    assert s.changes[6][1:3] + s.changes[6][4:] == (0.0,) * 4
    with pytest.raises(ValueError, match=r"steps \[0, 3\] must be full"):
        fora_fx.calibrate(pipe, lambda p: p([1.0] * 6), budget=1, config=EAGER)


def test_calibrate_a_diffusers_pipeline():
    """DiTPipeline: DDIM has no step_index (steps counted), batched CFG in one call."""
    import pipes

    case = pipes.make_pipe("dit")
    s = fora_fx.calibrate(case.pipe, lambda p: p(**case.call(0)), budget=4, config=EAGER)
    assert list(s.full) == [pipes.STEPS] and len(s.full[pipes.STEPS]) == 4
    assert type(case.pipe.transformer).__name__ == "DiTTransformer2DModel"
    assert no_hooks(case.pipe.transformer)
    fora_fx.transform(case.pipe, EAGER, schedule=s)
    case.pipe(**case.call(1))
    assert fora_fx.stats(case.pipe).history == [k in s.full[pipes.STEPS]
                                                for k in range(pipes.STEPS)]


def test_docs_example_runs():
    """docs/schedules.md's example, exec'd verbatim (the default Inductor compiler)."""
    block = re.search(r"exec'd verbatim.*?\n```python\n(.*?)```", DOCS.read_text(), re.S)
    assert block is not None, "docs/schedules.md lost its tested example"
    scope: dict = {}
    exec(block.group(1), scope)  # noqa: S102 - the documented user code is what is tested
    s = scope["schedule"]
    assert len(s.full[10]) == 4 and no_hooks(scope["model"])
