"""Unmodified diffusers pipelines (tiny random configs): interval=1 equals the untransformed
pipeline; interval=3 equals an eager FORA reference with per-branch caches, over several
consecutive calls with different seeds and prompts."""

from __future__ import annotations

from pipes import PIPES, build_wan22, make_pipe, output_tensor

import pytest
import torch
from reference_pipeline import PipelineEagerFora

import fora_fx

SEEDS = (0, 1, 2)


def _run(pipe, case, seeds=SEEDS):
    with torch.no_grad():
        return [output_tensor(pipe(**case.call(s))) for s in seeds]


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", sorted(PIPES))
def test_interval_1_equals_untransformed_pipeline(name):
    case = make_pipe(name)
    expected = _run(case.pipe, case)
    # Without the batch pass the graph runs the model's own ops: bit-exact. The batch pass
    # runs the blocks' conditioning Linears as one bmm, equal up to summation order (on an
    # AMD EPYC dev machine the DiT pipeline's images moved by 2.9e-6; bit-exact on others).
    with fora_fx.tuning.patch(batch_blocks=False):
        plain = fora_fx.transform(case.pipe, interval=1, compiler="eager")
    for e, g in zip(expected, _run(plain, case), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    fora_fx.restore(plain)
    pipe = fora_fx.transform(case.pipe, interval=1, compiler="eager")
    got = _run(pipe, case)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    stats = fora_fx.stats(pipe)
    assert stats.calls == len(SEEDS) * 8 * case.calls_per_step
    assert stats.reuses == 0
    fora_fx.restore(pipe)


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", sorted(PIPES))
def test_interval_3_equals_eager_reference(name):
    _check_interval_3(name, piecewise=None)


def test_interval_3_piecewise_equals_eager_reference():
    _check_interval_3("sd3_slg", piecewise=fora_fx.Piecewise())  # two calls per step


def _check_interval_3(name, piecewise):
    case = make_pipe(name)
    plain = _run(case.pipe, case, seeds=SEEDS[:1])

    ref = PipelineEagerFora(case.pipe, case.sites, interval=3)
    expected = _run(ref, case)
    ref_log = list(ref.log)
    ref.remove()

    pipe = fora_fx.transform(case.pipe, interval=3, compiler="eager", piecewise=piecewise)
    got = _run(pipe, case)
    history = fora_fx.stats(pipe).history
    fora_fx.restore(pipe)

    for k, (e, g) in enumerate(zip(expected, got, strict=True)):  # batched: see above
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"pipeline call {k}")
    assert history == [refreshed for _, _, refreshed in ref_log]
    # 8 steps: steps 0, 3, 6 and the last (7) recompute, per branch, per call.
    per_call = [True, False, False, True, False, False, True, True]
    branches = sorted({b for b, _, _ in ref_log})
    assert len(branches) == case.calls_per_step
    for b in branches:
        assert [r for br, _, r in ref_log if br == b] == per_call * len(SEEDS)
    assert not torch.allclose(got[0], plain[0])  # caching changed something


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", ["flux_true_cfg", "wan"])
def test_true_cfg_branches_are_named_by_cache_context(name):
    case = make_pipe(name)
    pipe = fora_fx.transform(case.pipe, interval=3, compiler="eager")
    _run(pipe, case, seeds=(0,))
    assert sorted(fora_fx.stats(pipe.transformer).branches) == ["cond", "uncond"]
    fora_fx.restore(pipe)


def test_skip_layer_guidance_call_gets_its_own_branch():
    case = make_pipe("sd3_slg")
    pipe = fora_fx.transform(case.pipe, interval=3, compiler="eager")
    _run(pipe, case, seeds=(0,))
    stats = fora_fx.stats(pipe)
    assert sorted(stats.branches) == ["call0", "call1"]
    # The skip-layer call has half the batch: its own graph, its own buffers.
    assert stats.graphs == 2
    fora_fx.restore(pipe)


def test_wan22_experts_are_both_cached_each_from_its_first_step():
    # Wan 2.2 A14B: transformer runs the high-noise steps 0-3, transformer_2 steps 4-7. Each
    # is transformed, with its own caches; the second's first call (step 4) recomputes.
    case = build_wan22()  # not in PIPES: the reference there caches `transformer` only
    plain = _run(case.pipe, case, seeds=SEEDS[:1])
    refs = [PipelineEagerFora(case.pipe, case.sites, interval=3, component=c)
            for c in ("transformer", "transformer_2")]
    expected = _run(refs[0], case, seeds=SEEDS[:2])
    logs = [list(r.log) for r in refs]
    for r in refs:
        r.remove()
    pipe = fora_fx.transform(case.pipe, interval=3, compiler="eager")
    assert type(pipe.transformer_2).__name__ == "ForaModule"
    got = _run(pipe, case, seeds=SEEDS[:2])
    histories = [fora_fx.stats(pipe.transformer).history,
                 fora_fx.stats(pipe.transformer_2).history]
    assert len(fora_fx.explain(pipe).sites) == len(case.sites)  # the same paths in both
    fora_fx.restore(pipe)
    assert type(case.pipe.transformer_2).__name__ == "WanTransformer3DModel"
    for k, (e, g) in enumerate(zip(expected, got, strict=True)):  # batched: see above
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=f"pipeline call {k}")
    for log, history in zip(logs, histories, strict=True):
        assert history == [refreshed for _, _, refreshed in log]
    # per call and branch: steps 0-3 refresh at 0 and 3; steps 4-7 at 4 (first), 6 and 7
    assert [r for b, _, r in logs[0] if b == "cond"] == [True, False, False, True] * 2
    assert [r for b, _, r in logs[1] if b == "cond"] == [True, False, True, True] * 2
    assert not torch.allclose(got[0], plain[0])
