"""Steps, guidance branches and generations of a transformed pipeline, checked exactly on
the toy model inside a diffusers-shaped fake pipeline (tests/fakepipe.py)."""

from __future__ import annotations

import pytest
import toy
from fakepipe import CountingScheduler, Pipe

import fora_fx

R, U = toy.recomputed, toy.reused


def expected(ts, interval=3, refresh_last=True):
    """The FORA values for one branch over one generation."""
    out, cached = [], None
    for k, t in enumerate(ts):
        if k % interval == 0 or (refresh_last and k == len(ts) - 1):
            out.append(R(t))
            cached = t
        else:
            out.append(U(t, cached))
    return out


TS = [1, 2, 3, 4, 5, 6, 7]  # 7 steps: refresh at 0, 3, 6 (6 is also the last)
TS2 = [9, 8, 7, 6, 5]  # 5 steps: refresh at 0, 3, 4 (last)


@pytest.mark.parametrize("scheduler", [None, CountingScheduler()], ids=["step_index", "counted"])
def test_each_pipeline_call_is_a_generation_and_last_step_recomputes(scheduler):
    pipe = fora_fx.transform(Pipe(scheduler), interval=3, compiler="eager")
    assert isinstance(pipe.transformer, fora_fx.ForaModule)
    assert [o[0] for o in pipe(TS)] == expected(TS)
    assert [o[0] for o in pipe(TS2)] == expected(TS2)  # no reset needed
    assert [o[0] for o in pipe(TS)] == expected(TS)


@pytest.mark.parametrize("scheduler", [None, CountingScheduler()], ids=["step_index", "counted"])
def test_two_experts_follow_the_pipelines_steps(scheduler):
    # Wan 2.2: transformer runs steps 0-1, transformer_2 steps 2-6, cond and uncond in
    # cache_context. The second expert's first call recomputes (its cache is empty); after
    # it both follow the pipeline's steps, also when the scheduler has no step_index and
    # steps are counted. Counting its own calls, transformer_2 would recompute at its 0 and
    # 3 (steps 2 and 5) and miss step 6.
    pipe = fora_fx.transform(Pipe(scheduler, boundary=2), interval=3, compiler="eager")
    second = [t + 10 for t in TS]
    for _ in range(2):
        out = pipe(TS, second=second, contexts=("cond", "uncond"))
        for branch, ts in enumerate((TS, second)):
            want = expected(ts)[:2] + [R(ts[2]), R(ts[3]), U(ts[4], ts[3]), U(ts[5], ts[3]),
                                       R(ts[6])]
            assert [o[branch] for o in out] == want
    histories = [fora_fx.stats(pipe.transformer).history,
                 fora_fx.stats(pipe.transformer_2).history]
    assert histories == [[True, True, False, False] * 2,
                         ([True] * 4 + [False] * 4 + [True] * 2) * 2]  # two branches
    fora_fx.reset(pipe)  # within a generation: the next call is step 0 for every expert
    expert = pipe.transformer_2
    with expert.cache_context("cond"):
        assert expert(*toy.inputs(5)).item() == R(5)
        pipe.scheduler.step()
        assert expert(*toy.inputs(6)).item() == U(6, 5)
    fora_fx.restore(pipe)


def test_two_calls_per_step_get_separate_caches():
    pipe = fora_fx.transform(Pipe(), interval=3, compiler="eager")
    second = [10 * t for t in TS]
    out = pipe(TS, second=second)
    assert [o[0] for o in out] == expected(TS)
    assert [o[1] for o in out] == expected(second)  # never the first branch's cache
    assert sorted(fora_fx.stats(pipe.transformer).branches) == ["call0", "call1"]


def test_cache_context_names_branches():
    pipe = fora_fx.transform(Pipe(), interval=3, compiler="eager")
    second = [10 * t for t in TS]
    out = pipe(TS, second=second, contexts=("cond", "uncond"))
    assert [o[0] for o in out] == expected(TS)
    assert [o[1] for o in out] == expected(second)
    assert sorted(fora_fx.stats(pipe.transformer).branches) == ["cond", "uncond"]


def test_call_that_raised_midway_leaves_nothing_behind():
    pipe = fora_fx.transform(Pipe(), interval=3, compiler="eager")
    with pytest.raises(RuntimeError, match="interrupted"):
        pipe(TS, fail_at=4)
    assert [o[0] for o in pipe(TS2)] == expected(TS2)


def test_scheduler_replaced_after_transform():
    pipe = fora_fx.transform(Pipe(), interval=3, compiler="eager")
    pipe(TS)
    pipe.scheduler = CountingScheduler()
    assert [o[0] for o in pipe(TS2)] == expected(TS2)


def test_restore_puts_the_original_back():
    raw = Pipe()
    original = raw.transformer
    pipe = fora_fx.transform(raw, interval=3, compiler="eager")
    assert pipe is raw
    pipe(TS)
    assert fora_fx.explain(pipe).cache_bytes > 0
    assert fora_fx.restore(pipe) is raw and raw.transformer is original
    assert [o[0] for o in raw(TS)] == [R(t) for t in TS]  # uncached again
    with pytest.raises(TypeError, match="was not transformed"):
        fora_fx.restore(raw)


def test_pipeline_errors_say_what_is_valid():
    class NoTransformer:
        scheduler = None
        unet = toy.Toy()
        components = {"unet": unet, "scheduler": None}

    msg = r"has no `transformer` module.*UNet.*\['scheduler', 'unet'\]"
    with pytest.raises(TypeError, match=msg):
        fora_fx.transform(NoTransformer())
    pipe = fora_fx.transform(Pipe(), compiler="eager")
    with pytest.raises(TypeError, match="already transformed"):
        fora_fx.transform(pipe)
