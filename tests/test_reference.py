"""Self-tests for the eager FORA reference (tests/reference.py) on the zoo models."""

from __future__ import annotations

import pytest
import torch

try:
    from tests.reference import EagerFora, refresh_schedule
    from tests.zoo import CASES, make, output_tensor
except ImportError:  # tests/ itself on sys.path (pytest rootdir-less import)
    from reference import EagerFora, refresh_schedule
    from zoo import CASES, make, output_tensor

SEED = 1234


def _plain(case, step: int) -> torch.Tensor:
    args, kwargs = case.inputs(step, SEED)
    with torch.no_grad():
        return output_tensor(case.model(*args, **kwargs))


def _fora(fora: EagerFora, case, step: int) -> torch.Tensor:
    args, kwargs = case.inputs(step, SEED)
    return output_tensor(fora(*args, **kwargs))


def test_refresh_schedule():
    got = [refresh_schedule(s, 3) for s in range(8)]
    assert got == [True, False, False, True, False, False, True, False]
    got = [refresh_schedule(s, 3, warmup_steps=2, num_steps=8) for s in range(8)]
    assert got == [True, True, False, True, False, False, True, True]
    got = [refresh_schedule(s, 3, num_steps=8, refresh_last=False) for s in range(8)]
    assert got == [True, False, False, True, False, False, True, False]
    with pytest.raises(ValueError):
        refresh_schedule(0, 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interval_one_is_identity(name):
    case = make(name)
    plain = [_plain(case, s) for s in range(3)]
    fora = EagerFora(case.model, case.sites, interval=1)
    try:
        for s in range(3):
            torch.testing.assert_close(_fora(fora, case, s), plain[s], rtol=0, atol=0)
        assert fora.refreshed == [True, True, True]
    finally:
        fora.remove()
    # remove() restored the original forwards
    for path in case.sites:
        assert "forward" not in case.model.get_submodule(path).__dict__
    torch.testing.assert_close(_plain(case, 0), plain[0], rtol=0, atol=0)


def test_interval_three_timm_caches_and_resets():
    case = make("timm")
    plain = [_plain(case, s) for s in range(5)]
    fora = EagerFora(case.model, case.sites, interval=3)
    try:
        outs = [_fora(fora, case, s) for s in range(5)]
        assert fora.refreshed == [True, False, False, True, False]
        torch.testing.assert_close(outs[0], plain[0], rtol=0, atol=0)
        torch.testing.assert_close(outs[3], plain[3], rtol=0, atol=0)
        for s in (1, 2, 4):
            assert (outs[s] - plain[s]).abs().max() > 1e-3, f"step {s} not affected by caching"

        # reset: next call is step 0 (refresh), then step 1 replays step 0's cache again
        fora.reset()
        assert fora.refreshed == []
        again = [_fora(fora, case, s) for s in range(3)]
        assert fora.refreshed == [True, False, False]
        for a, b in zip(again, outs[:3], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        fora.remove()


def test_num_steps_wraps_and_refreshes_last():
    case = make("timm")
    fora = EagerFora(case.model, case.sites, interval=3, num_steps=5)
    try:
        outs = [_fora(fora, case, s % 5) for s in range(10)]
        pattern = [True, False, False, True, True]
        assert fora.refreshed == pattern + pattern
        for a, b in zip(outs[:5], outs[5:], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(outs[4], _plain(case, 4), rtol=0, atol=0)
    finally:
        fora.remove()


def test_reuse_returns_cached_site_outputs():
    """On reuse steps each site returns exactly its output from the last refresh step."""
    case = make("sd3")  # has tuple-returning joint attention sites
    seen: dict[str, list] = {p: [] for p in case.sites}
    fora = EagerFora(case.model, case.sites, interval=2)
    hooks = [
        case.model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen[p].append(o))
        for p in case.sites
    ]
    try:
        for s in range(3):
            _fora(fora, case, s)
    finally:
        for h in hooks:
            h.remove()
        fora.remove()
    assert fora.refreshed == [True, False, True]
    for p, outs in seen.items():
        first, reused, fresh = outs
        torch.testing.assert_close(reused, first, rtol=0, atol=0)
        assert type(reused) is type(first)
        a = first[0] if isinstance(first, tuple) else first
        b = fresh[0] if isinstance(fresh, tuple) else fresh
        assert not torch.equal(a, b), p
