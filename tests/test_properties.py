"""Hypothesis: random transformer configs against the eager reference, and random call
sequences against the toy's closed-form oracle."""

from __future__ import annotations

import contextlib

import torch
import toy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from reference import EagerFora
from zoo import TimmDiT

import fora_fx
from fora_fx import ForaConfig


@settings(max_examples=8)
@given(
    depth=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8]),
    mlp_ratio=st.sampled_from([1.0, 2.0, 4.0]),
    cross=st.booleans(),
    interval=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_random_transformers_match_reference(
    depth, heads, head_dim, mlp_ratio, cross, interval, seed
):
    torch.manual_seed(seed)
    width = heads * head_dim
    ctx_dim = 12 if cross else None
    model = TimmDiT(input_size=4, hidden_size=width, depth=depth, num_heads=heads,
                    context_dim=ctx_dim, mlp_ratio=mlp_ratio).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, generator=g)
    y = torch.tensor([1, 3])
    ctx = (torch.randn(2, 5, 12, generator=g),) if cross else ()

    def call(m, k):
        t = torch.full((2,), 900.0 - 90 * k)
        with torch.no_grad():
            return m(x, t, y, *ctx)

    fast = fora_fx.transform(model, interval=interval, compiler="eager")
    got = [call(fast, k) for k in range(5)]
    names = [f"blocks.{i}.{s}" for i in range(depth)
             for s in (("attn", "cross_attn", "mlp") if cross else ("attn", "mlp"))]
    assert [s.module_path for s in fora_fx.explain(fast).sites] == names
    ref = EagerFora(model, names, interval=interval)
    expected = [call(ref, k) for k in range(5)]
    ref.remove()
    for e, o in zip(expected, got, strict=True):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)


class ToySequences(RuleBasedStateMachine):
    """Steps, guidance branches, resets, batch-size changes, failing calls, and two models
    interleaved, each checked exactly against a closed-form oracle per (model, branch)."""

    config = ForaConfig(interval=3, compiler="eager")
    _models: dict[ForaConfig, list[fora_fx.ForaModule]] = {}

    @initialize()
    def start(self):
        if self.config not in self._models:  # one capture per config, shared by examples
            self._models[self.config] = [fora_fx.transform(toy.Toy(), self.config)
                                         for _ in range(2)]
        self.models = self._models[self.config]
        self.oracle: list[dict[str, list]] = [{}, {}]  # branch -> [calls, owner batch, t]
        for m in self.models:
            fora_fx.reset(m)

    @rule(m=st.integers(0, 1), t=st.integers(1, 9), batch=st.sampled_from([1, 1, 1, 2]),
          branch=st.sampled_from([None, None, "cond", "uncond"]))
    def call(self, m, t, batch, branch):
        state = self.oracle[m].setdefault(branch or "default", [0, None, None])
        calls, owner, cached_t = state
        refresh = self.config.refreshes(calls) or batch != owner
        model = self.models[m]
        ctx = model.cache_context(branch) if branch else contextlib.nullcontext()
        with ctx:
            out = model(*toy.inputs(t, batch)).flatten().tolist()
        if refresh:
            expected = toy.recomputed(t)
            owner, cached_t = batch, t
        else:
            expected = toy.reused(t, cached_t)
        assert out == [expected] * batch
        calls += 1
        if self.config.num_steps is not None and calls == self.config.num_steps:
            calls, owner = 0, None
        self.oracle[m][branch or "default"] = [calls, owner, cached_t]

    @rule(m=st.integers(0, 1))
    def reset(self, m):
        fora_fx.reset(self.models[m])
        for state in self.oracle[m].values():
            state[0], state[1] = 0, None

    @rule(m=st.integers(0, 1))
    def bad_call(self, m):
        x, t = toy.inputs(1)
        try:
            self.models[m](x.expand(1, 1, 1, 2), t)  # width 2 into Linear(1, 1): must raise
        except Exception:
            pass
        else:
            raise AssertionError("a bad input did not raise")

    @invariant()
    def counters_agree(self):
        if hasattr(self, "models"):
            for m, model in enumerate(self.models):
                default = self.oracle[m].get("default", [0])
                assert fora_fx.stats(model).step == default[0]


class ToySequencesWrapping(ToySequences):
    config = ForaConfig(interval=2, warmup_steps=2, num_steps=5, compiler="eager")


TestToySequences = ToySequences.TestCase
TestToySequencesWrapping = ToySequencesWrapping.TestCase
for _case in (TestToySequences, TestToySequencesWrapping):
    _case.settings = settings(max_examples=25, stateful_step_count=15)
