"""Calls that skip the guards also skip Dynamo's frame (fora_fx/fastpath.py) where a record of
the generation's first call replays that frame exactly; elsewhere they go through Dynamo."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import CASES, TimmDiT, make, output_tensor, run_steps

import fora_fx
from fora_fx import fastpath


def _pair(model: nn.Module, **options):
    fast = fora_fx.transform(model, interval=3, num_steps=6, **options)
    with fora_fx.tuning.patch(fast_calls="unguarded"):
        return fast, fora_fx.transform(copy.deepcopy(model), interval=3, num_steps=6, **options)


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", sorted(CASES))
def test_direct_calls_give_the_frames_result_on_every_zoo_model(name):
    case = make(name)
    fast, through_dynamo = _pair(case.model, compiler="eager")
    want = run_steps(through_dynamo, case, 6, seed=3)
    for got, expected in zip(run_steps(fast, case, 6, seed=3), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert fora_fx.stats(fast).direct == 5  # every call but the generation's first
    assert fora_fx.stats(through_dynamo).direct == 0
    assert fora_fx.stats(through_dynamo).unguarded == 5
    assert "5 skipped Dynamo's guards, 5 of them its frame too" in str(fora_fx.explain(fast))


def test_direct_calls_through_aot_autograd_read_live_parameters():
    # aot_eager: the compiled variants take the flat inputs the way Inductor's do. Loading
    # new weights in place mid-generation keeps every parameter's storage (so the calls stay
    # direct) and must reach the next call, as it would through Dynamo's per-call fetch.
    case = make("dit")
    fast, through_dynamo = _pair(case.model, compiler="aot_eager")
    other = {k: v + 0.01 for k, v in case.model.state_dict().items()}
    for k in range(6):
        if k == 3:  # a refresh step: the new weights feed every site
            for m in (fast, through_dynamo):
                m.load_state_dict(other)
        args, kwargs = case.inputs(k, 4)
        with torch.no_grad():
            got = output_tensor(fast(*args, **kwargs))
            want = output_tensor(through_dynamo(*args, **kwargs))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fora_fx.stats(fast).direct == 5


class _Nested(nn.Module):
    """Takes its conditioning as a dict: the direct call reads tensors at nested paths."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, cond):
        return self.inner(x, cond["t"], cond["y"])


def test_arguments_at_nested_paths_are_read_from_each_call():
    case = make("timm")
    fast, through_dynamo = _pair(_Nested(case.model), compiler="eager")
    for k in range(6):
        (x, t, y), _ = case.inputs(k, 7)
        # keys in either order: an argument is found by its key, not its position
        cond = {"t": t, "y": y} if k % 2 else {"y": y, "t": t}
        with torch.no_grad():
            got = fast(x, cond)
            want = through_dynamo(x, {"t": t, "y": y})
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert fora_fx.stats(fast).direct == 5


class _Shifted(nn.Module):
    """Reads a plain tensor attribute (not a parameter or buffer), as Kandinsky 5's time
    embedding does: Dynamo lifts it as a graph input of its own."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.shift = torch.full((1,), 0.5)

    def forward(self, x, t, y):
        return self.inner(x + self.shift, t, y)


def test_tensor_attributes_are_held_while_they_hold_the_same_tensor():
    case = make("timm")
    fast, through_dynamo = _pair(_Shifted(case.model), compiler="eager")
    direct_before = []
    for k in range(6):
        args, _ = case.inputs(k, 5)
        if k == 2:  # in place: the same tensor, seen by the direct call
            for m in (fast, through_dynamo):
                m.shift.fill_(-0.25)
        if k == 4:  # reassigned: the next call goes through Dynamo again
            for m in (fast, through_dynamo):
                m.shift = torch.full((1,), 1.5)  # reaches the wrapped model
        direct_before.append(fora_fx.stats(fast).direct)
        with torch.no_grad():
            got, want = fast(*args), through_dynamo(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # calls 1, 2, 3 and 5 direct; call 4 saw a reassigned attribute and was guarded
    assert direct_before[1:] + [fora_fx.stats(fast).direct] == [0, 1, 2, 3, 3, 4]
    # with the attribute unread, the shifts would not have moved the output (can fail)
    assert not torch.equal(fast(*case.inputs(0, 5)[0]), fast.inner(*case.inputs(0, 5)[0]))


class _Logging(TimmDiT):
    """A forward with a Python side effect, which Dynamo replays in its frame."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x, t, y, context=None):
        self.calls.append(1)
        return super().forward(x, t, y, context)


def test_a_frame_with_side_effects_is_neither_skipped_nor_unguarded():
    torch.manual_seed(0)
    model = _Logging().eval()
    case = make("timm")
    fast = fora_fx.transform(model, interval=3, num_steps=6, compiler="eager")
    run_steps(fast, case, 6, seed=1)
    # Dynamo replays the mutation as the list it traced and guards on the list's length: an
    # unguarded call would set `calls` back to [1]. Every call is guarded (and recompiles).
    assert fora_fx.stats(fast).direct == 0 and fora_fx.stats(fast).unguarded == 0
    assert len(model.calls) == 6
    assert "side effects: every call is guarded" in str(fora_fx.explain(fast))


class _Stub:
    frame_effects: bool | None = False

    def __call__(self, *flat):
        return (flat[0] * 2, flat[1] + 1)


def test_plan_declines_what_it_cannot_replay():
    model = nn.Linear(2, 2)
    w = model.weight
    x, y = torch.ones(2), torch.zeros(2)
    stub = _Stub()
    outs = stub(x, w)
    stub.entry = stub
    ok = fastpath.plan((stub, (x, w), outs), (x,), {}, {"a": outs[0], "b": [outs[1], 3]}, model)
    assert ok is not None
    again = ok((y,), {})  # a new argument is read; the parameter is kept
    assert torch.equal(again["a"], y * 2) and torch.equal(again["b"][0], w + 1)
    assert again["b"][1] == 3
    # each of these must decline:
    for unknown_or_yes in (None, True):
        effects = _Stub()
        effects.frame_effects = unknown_or_yes
        assert fastpath.plan((effects, (x, w), outs), (x,), {}, outs, model) is None
    assert fastpath.plan((stub, (x, w), outs), (x, x), {}, outs, model) is None  # x twice
    assert fastpath.plan((stub, (x, y), outs), (x,), {}, outs, model) is None  # y: from where?
    assert fastpath.plan((stub, (x, w), outs), (x,), {}, outs[0], model) is None  # unreturned
    assert fastpath.plan((stub, (x, w), outs), (x,), {}, (outs[0], outs[1] + 0), model) is None
    assert fastpath.plan((stub, (x, w), outs), (x,), {}, (*outs, object()), model) is None
    # no compiled pair ran, or several (a graph break): nothing to skip
    path = fastpath.FastPath("direct", model)
    for records in ([], [(stub, (x, w), outs)] * 2):
        path.learn(("sig",), records, (x,), {}, outs)
        assert path.last is None and path.direct is None
    path.learn(("sig",), [(stub, (x, w), outs)], (x,), {}, outs)
    assert path.last is not None and path.direct is not None


def test_every_call_starts_a_new_compiled_invocation_as_torch_compile_does():
    # CUDA-graph trees start a new inference iteration when Dynamo's generation counter moves,
    # which entering a torch.compile'd function does on every call. A direct call skips that
    # entry, so it must move the counter itself, or under mode="reduce-overhead" the trees
    # would take a whole generation for one iteration (fora_fx/fastpath.py).
    from torch._dynamo.mutation_guard import GenerationTracker

    case = make("dit")
    fast = fora_fx.transform(case.model, interval=3, num_steps=6, compiler="eager")
    moved = []
    for k in range(6):
        args, kwargs = case.inputs(k, 4)
        before = GenerationTracker.generation
        with torch.no_grad():
            fast(*args, **kwargs)
        moved.append(GenerationTracker.generation - before)
    assert fora_fx.stats(fast).direct == 5
    assert all(m >= 1 for m in moved), moved
