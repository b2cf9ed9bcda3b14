"""ForaConfig validation and the schedule rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fora_fx import ForaConfig


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"interval": 0}, "interval must be an int >= 1"),
        ({"interval": -3}, "interval must be an int >= 1"),
        ({"interval": 2.5}, "interval must be an int >= 1"),
        ({"interval": True}, "interval must be an int >= 1"),
        ({"interval": "3"}, "interval must be an int >= 1"),
        ({"warmup_steps": 0}, "warmup_steps must be an int >= 1"),
        ({"num_steps": 0}, "num_steps must be an int >= 1"),
        ({"refresh_last": 1}, "refresh_last must be a bool"),
        ({"sites": ("attn", "ffn")}, r"sites must be a non-empty subset of \('attn'"),
        ({"sites": ()}, "sites must be a non-empty subset"),
        ({"compiler": "tvm"}, r"compiler must be one of \('inductor', 'aot_eager', 'eager'\)"),
        ({"mode": "fast"}, "mode must be one of"),
        ({"exclude": ("blocks.0.*", 3)}, "exclude must be a tuple of module-path patterns"),
        ({"exclude": ("",)}, "exclude must be a tuple of module-path patterns"),
        ({"piecewise": True}, r"piecewise must be None or fora_fx.Piecewise"),
        ({"mode": "reduce-overhead", "compiler": "eager"}, "needs compiler='inductor'"),
        ({"batch_blocks": False}, r"use fora_fx.tuning.patch\(batch_blocks=...\)"),
    ],
)
def test_invalid_values_say_what_is_valid(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ForaConfig(**kwargs)


def test_frozen_and_normalised():
    cfg = ForaConfig(sites="mlp", exclude="context_embedder.*")
    assert cfg.sites == ("mlp",) and cfg.exclude == ("context_embedder.*",)
    assert cfg.excluded_by("context_embedder.token_refiner.refiner_blocks.0.attn") == (
        "context_embedder.*")
    assert cfg.excluded_by("transformer_blocks.0.attn") is None
    with pytest.raises(AttributeError):
        cfg.interval = 5  # type: ignore[misc]


def test_from_options_rejects_unknown_and_merges_mode():
    with pytest.raises(ValueError, match=r"unknown fora option\(s\) \['intervall'\]"):
        ForaConfig.from_options({"intervall": 3})
    assert ForaConfig.from_options(None, mode="reduce-overhead").mode == "reduce-overhead"
    assert ForaConfig.from_options({"interval": 4}).interval == 4


def test_schedule_matches_official_code_counting_down():
    # Official FORA counts i = T-1 ... 0 and computes iff i == T-1 or i % N == 0. With
    # T - 1 a multiple of N, that is our k % N == 0 with the last step recomputing.
    T, N = 10, 3
    official = [(i == T - 1 or i % N == 0) for i in range(T - 1, -1, -1)]
    cfg = ForaConfig(interval=N, num_steps=T)
    assert [cfg.refreshes(k) for k in range(T)] == official


@given(
    interval=st.integers(1, 9),
    warmup=st.integers(1, 4),
    num_steps=st.one_of(st.none(), st.integers(1, 30)),
    refresh_last=st.booleans(),
)
def test_schedule_properties(interval, warmup, num_steps, refresh_last):
    cfg = ForaConfig(
        interval=interval, warmup_steps=warmup, num_steps=num_steps, refresh_last=refresh_last
    )
    steps = range(num_steps or 40)
    decisions = [cfg.refreshes(k) for k in steps]
    assert decisions[0]  # step 0 always recomputes
    assert all(decisions[: min(warmup, len(decisions))])
    if interval == 1:
        assert all(decisions)
    if num_steps is not None and refresh_last:
        assert decisions[-1]
    # never more than interval - 1 reuses in a row
    run = 0
    for d in decisions:
        run = 0 if d else run + 1
        assert run < interval
