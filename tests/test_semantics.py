"""FORA semantics: interval=1 is the original model; interval=N is the eager reference FORA;
the hand-computable toy gives exact numbers."""

from __future__ import annotations

import pytest
import torch
import toy
from reference import EagerFora
from zoo import CASES, make, run_steps

import fora_fx

SEED = 7


def _run(model, case, steps, seed=SEED):
    return run_steps(model, case, steps, seed)


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", sorted(CASES))
def test_interval_1_equals_original(name):
    case = make(name)
    expected = _run(case.model, case, 3)
    fast = fora_fx.transform(case.model, interval=1, compiler="eager")
    got = _run(fast, case, 3)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert fora_fx.stats(fast).reuses == 0


@pytest.mark.shares_captures
@pytest.mark.parametrize(
    "name, compiler",
    [(n, "eager") for n in sorted(CASES)] + [("dit", "aot_eager"), ("pixart", "aot_eager")],
)
def test_matches_eager_reference_over_two_generations(name, compiler):
    case = make(name)
    fast = fora_fx.transform(case.model, interval=3, compiler=compiler)
    got = _run(fast, case, 5, seed=1)
    fora_fx.reset(fast)
    got += _run(fast, case, 5, seed=2)

    ref = EagerFora(case.model, case.sites, interval=3)
    expected = _run(ref, case, 5, seed=1)
    decisions = list(ref.refreshed)
    ref.reset()
    expected += _run(ref, case, 5, seed=2)
    decisions += ref.refreshed
    ref.remove()

    for k, (e, g) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    assert fora_fx.stats(fast).history == decisions == [True, False, False, True, False] * 2
    # Caching really changed the result on reuse steps (the check can fail).
    plain = _run(case.model, case, 2, seed=1)
    assert not torch.allclose(plain[1], got[1])


def test_toy_exact_values():
    fast = fora_fx.transform(toy.Toy(), interval=3, compiler="eager")
    got = [fast(*toy.inputs(t)).item() for t in (1, 2, 3, 4, 5, 6, 7)]
    r = toy.recomputed
    assert got == [r(1), toy.reused(2, 1), toy.reused(3, 1), r(4), toy.reused(5, 4),
                   toy.reused(6, 4), r(7)]
    assert got[:4] == [4.0, 6.0, 8.0, 40.0]
    fora_fx.reset(fast)
    assert fast(*toy.inputs(9)).item() == r(9)  # a new generation recomputes at once


def test_num_steps_wraps_and_refreshes_last():
    fast = fora_fx.transform(toy.Toy(), interval=3, num_steps=5, compiler="eager")
    ts = [1, 2, 3, 4, 5, 11, 12, 13]  # 5 steps, then a new generation without reset
    got = [fast(*toy.inputs(t)).item() for t in ts]
    r, u = toy.recomputed, toy.reused
    # steps 0..4: refresh, reuse, reuse, refresh, refresh (last step); then step 0 again.
    assert got == [r(1), u(2, 1), u(3, 1), r(4), r(5), r(11), u(12, 11), u(13, 11)]


def test_warmup_steps():
    fast = fora_fx.transform(toy.Toy(), interval=2, warmup_steps=3, compiler="eager")
    got = [fast(*toy.inputs(t)).item() for t in (1, 2, 3, 4, 5, 6)]
    r, u = toy.recomputed, toy.reused
    # steps 0-2 warm up; then k % 2 == 0 recomputes
    assert got == [r(1), r(2), r(3), u(4, 3), r(5), u(6, 5)]


def test_new_shape_recomputes_and_old_cache_is_never_read():
    fast = fora_fx.transform(toy.Toy(), interval=4, compiler="eager")
    r, u = toy.recomputed, toy.reused
    assert fast(*toy.inputs(1)).item() == r(1)
    assert fast(*toy.inputs(2)).item() == u(2, 1)
    # Batch size changes mid-generation: a new graph, whose cache is empty -> recompute.
    out = fast(*toy.inputs(3, batch=2))
    assert out.flatten().tolist() == [r(3), r(3)]
    # Back to batch 1 at a reuse step: the batch-1 cache is from t=1, older than the last
    # refresh, so it must not be read.
    assert fast(*toy.inputs(5)).item() == r(5)
    assert fora_fx.stats(fast).graphs == 2


def test_excluded_sites_run_every_step_and_are_listed():
    # Block 0 kept exact: its attention and MLP recompute on every step, as in the reference
    # that caches block 1 only.
    case = make("dit")
    fast = fora_fx.transform(case.model, interval=3, compiler="eager",
                             exclude=("transformer_blocks.0.*",))
    got = _run(fast, case, 4, seed=1)
    kept = [p for p in case.sites if p.startswith("transformer_blocks.1.")]
    ref = EagerFora(case.model, kept, interval=3)
    expected = _run(ref, case, 4, seed=1)
    ref.remove()
    for k, (e, g) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    explained = fora_fx.explain(fast)
    assert [s.module_path for s in explained.sites] == kept
    assert "transformer_blocks.0.attn1 (attn): excluded by 'transformer_blocks.0.*'" in str(
        explained)
    # Caching every block gives another result on a reuse step (the check can fail).
    everything = fora_fx.transform(make("dit").model, interval=3, compiler="eager")
    assert not torch.allclose(_run(everything, case, 2, seed=1)[1], got[1])


def test_hunyuan_token_refiner_caching_changes_no_result():
    # The refiner's output (prompt tokens) mixes with the video tokens only inside cached
    # attentions; on a reuse step it reaches only the prompt positions the model drops at
    # the end. So caching it or not gives the same output.
    case = make("hunyuan_video")
    cached = _run(fora_fx.transform(case.model, interval=3, compiler="eager"), case, 3)
    kept = fora_fx.transform(make("hunyuan_video").model, interval=3, compiler="eager",
                             exclude=("context_embedder.*",))
    for a, b in zip(cached, _run(kept, case, 3), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "token_refiner" in fora_fx.explain(kept, graph=True).graphs["reuse"]  # computed
