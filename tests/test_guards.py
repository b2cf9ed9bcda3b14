"""ForaModule skips Dynamo's guard evaluation only on calls that continue a generation and
repeat the previous call exactly (fora_fx/fastpath.py); anything else is guarded and right."""

from __future__ import annotations

import copy

import torch
from zoo import make, output_tensor

import fora_fx
from fora_fx import fastpath


def _call(model, case, step, seed=5, **override):
    args, kwargs = case.inputs(step, seed)
    kwargs.update(override)
    with torch.no_grad():
        return output_tensor(model(*args, **kwargs))


def test_steady_calls_skip_guards_and_each_generation_starts_guarded():
    case = make("dit")
    fast = fora_fx.transform(case.model, interval=3, num_steps=6, compiler="eager")
    for k in range(6):
        _call(fast, case, k)
    assert fora_fx.stats(fast).unguarded == 5  # all but the generation's first call
    for k in range(3):  # num_steps wrapped: a new generation, whose first call is guarded
        _call(fast, case, k)
    assert fora_fx.stats(fast).unguarded == 7
    fora_fx.reset(fast)
    _call(fast, case, 0)
    assert fora_fx.stats(fast).unguarded == 7


def test_skipped_guards_change_no_result():
    case = make("dit")
    with fora_fx.tuning.patch(fast_calls="off"):
        plain = fora_fx.transform(copy.deepcopy(case.model), interval=2, compiler="eager")
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    for k in range(5):
        torch.testing.assert_close(_call(fast, case, k), _call(plain, case, k), rtol=0, atol=0)
    assert fora_fx.stats(plain).unguarded == 0 and fora_fx.stats(fast).unguarded == 4


def test_a_new_shape_mid_generation_is_guarded_and_recompiles():
    case, small = make("dit"), make("dit", batch=1)
    fast = fora_fx.transform(case.model, interval=3, compiler="eager")
    with fora_fx.tuning.patch(fast_calls="off"):
        reference = fora_fx.transform(copy.deepcopy(case.model), interval=3, compiler="eager")
    for k in range(2):
        _call(fast, case, k)
        _call(reference, case, k)
    before = fora_fx.stats(fast).unguarded
    got, want = _call(fast, small, 2), _call(reference, small, 2)
    assert got.shape[0] == 1 and fora_fx.stats(fast).unguarded == before
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fora_fx.stats(fast).graphs == 2  # compiled for the new shape


def test_model_changes_mid_generation_are_guarded():
    case = make("dit")
    fast = fora_fx.transform(case.model, interval=3, compiler="eager")
    _call(fast, case, 0)
    _call(fast, case, 1)
    assert fora_fx.stats(fast).unguarded == 1
    case.model.double()  # new storage and dtype for every parameter
    args, kwargs = case.inputs(2, 5)
    kwargs = {k: v.double() if torch.is_floating_point(v) else v for k, v in kwargs.items()}
    with torch.no_grad():
        out = output_tensor(fast(*args, **kwargs))
    assert out.dtype == torch.float64 and fora_fx.stats(fast).unguarded == 1
    case.model.float().train()
    _call(fast, case, 3)
    assert fora_fx.stats(fast).unguarded == 1


def test_inputs_it_cannot_describe_are_guarded():
    assert fastpath.signature((torch.zeros(2),), {"t": 3, "d": {"a": None}}) is not None
    assert fastpath.signature((object(),), {}) is None
    a = fastpath.signature((torch.zeros(2, 3),), {})
    assert a != fastpath.signature((torch.zeros(3, 2),), {})
    assert a != fastpath.signature((torch.zeros(2, 3, dtype=torch.float64),), {})
    assert a != fastpath.signature((torch.zeros(3, 2).t(),), {})  # strides differ
    assert fastpath.signature((), {"t": 3}) != fastpath.signature((), {"t": 4})
