"""cache-dit (optional peer) on the trained digits DiT: exactness at n=1, the static mask's
measured skip fraction, state reset between generations, and closeness to the baseline."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("cache_dit")

from fora_fx.peers_cachedit import CacheDitPeer, available, static_mask  # noqa: E402
from fora_fx.quality.evaluate import sample  # noqa: E402
from fora_fx.quality.metrics import psnr  # noqa: E402
from fora_fx.quality.model import load_trained  # noqa: E402

# One worker for all of this file (tests/run.sh): its tests share state.
pytestmark = pytest.mark.xdist_group("cachedit")

STEPS, BATCH, CFG, SEED = 10, 8, 2.0, 0
LABELS = torch.arange(BATCH) % 10


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return load_trained()


@pytest.fixture(scope="module")
def reference(base: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return sample(base, LABELS, SEED, "ddim", STEPS, CFG, BATCH)


def _run(peer: CacheDitPeer, kind: str = "ddim", steps: int = STEPS) -> torch.Tensor:
    with torch.no_grad():
        return sample(peer, LABELS, SEED, kind, steps, CFG, BATCH, before=peer.start_generation)


def test_available() -> None:
    assert available()


def test_static_mask_matches_fora_schedule() -> None:
    for n, steps in [(1, 10), (2, 20), (3, 10), (3, 50), (4, 20), (7, 50)]:
        assert static_mask(n, steps) == [int(i % n == 0) for i in range(steps)]


def test_interval_one_is_exact(base: torch.nn.Module, reference: torch.Tensor) -> None:
    peer = CacheDitPeer(copy.deepcopy(base), n=1, num_steps=STEPS, calibrator=None)
    out = _run(peer)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    assert peer.calls == STEPS and peer.skipped() == 0.0


@pytest.mark.parametrize("calibrator", [None, "taylorseer"])
def test_interval_three_skips_and_resets(base: torch.nn.Module, reference: torch.Tensor,
                                         calibrator: str | None) -> None:
    peer = CacheDitPeer(copy.deepcopy(base), n=3, num_steps=STEPS, calibrator=calibrator)
    first = _run(peer)
    second = _run(peer)  # same seed: identical only if start_generation reset all state
    assert torch.equal(first, second)
    # mask 1001001001: 6 cached steps x 4 of 5 blocks (block 0 is cache-dit's Fn block)
    assert peer.calls == 2 * STEPS
    assert peer.expected_skipped() == pytest.approx(6 * 4 / (STEPS * 5))
    assert peer.skipped() == pytest.approx(peer.expected_skipped())
    assert not torch.equal(first, reference)  # caching really changed the computation
    assert psnr(first, reference).mean().item() > 15.0


def test_dpm_solver(base: torch.nn.Module) -> None:
    steps = 20
    with torch.no_grad():
        ref = sample(base, LABELS, SEED, "dpm", steps, CFG, BATCH)
    peer = CacheDitPeer(copy.deepcopy(base), n=3, num_steps=steps, calibrator="taylorseer")
    out = _run(peer, "dpm", steps)
    assert peer.skipped() == pytest.approx(peer.expected_skipped())
    assert psnr(out, ref).mean().item() > 15.0


def test_unknown_calibrator(base: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="calibrator"):
        CacheDitPeer(copy.deepcopy(base), n=3, num_steps=STEPS, calibrator="foca")
