"""The shared timing helper (fora_fx.bench.timing.interleave / summarize), on a fake clock:
the order it runs variants in, the median and spread of per-round speedups, and when it flags
a run as unreliable. No wall-clock time is measured here."""

from __future__ import annotations

import pytest

from fora_fx.bench.timing import Spread, interleave, rotation, summarize


class FakeClock:
    """Time advances only when a variant runs, by its cost times the round's load."""

    def __init__(self) -> None:
        self.now = 0.0
        self.ran: list[tuple[str, int]] = []

    def __call__(self) -> float:
        return self.now

    def variant(self, name: str, cost: float, load=lambda r: 1.0):
        def run(r: int) -> str:
            self.ran.append((name, r))
            self.now += cost * load(r)
            return f"{name}@{r}"
        return run


def test_rotation_gives_every_variant_every_position():
    order = rotation(["a", "b", "c"], 4)
    assert order == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    for pos in range(3):
        assert {o[pos] for o in order[:3]} == {"a", "b", "c"}


def test_interleave_runs_each_variant_once_per_round_in_rotating_order():
    clock = FakeClock()
    variants = {n: clock.variant(n, c) for n, c in (("base", 4.0), ("n1", 4.0), ("n3", 2.0))}
    t = interleave(variants, 3, "base", controls=["n1"], clock=clock, keep=True)
    assert clock.ran == [("base", 0), ("n1", 0), ("n3", 0), ("n1", 1), ("n3", 1), ("base", 1),
                         ("n3", 2), ("base", 2), ("n1", 2)]
    assert t.times["n3"] == [2.0, 2.0, 2.0] and t.speedup("n3") == 2.0
    assert t.outputs["n3"] == ["n3@0", "n3@1", "n3@2"]
    assert not t.unreliable and t.noise == 0.0 and t.band == 0.10


def test_a_load_change_between_rounds_cancels_in_the_per_round_ratios():
    # Timed one block after the other, a baseline that ran during a busy spell and variants
    # that ran after it would make interval=1 look 3x faster (issue 19). Here the load
    # changes between rounds: every variant of a round sees the same load.
    clock = FakeClock()
    load = [3.0, 1.0, 1.0, 2.0, 1.0].__getitem__
    variants = {n: clock.variant(n, c, load) for n, c in (("base", 4.0), ("n1", 4.0),
                                                            ("n6", 1.0))}
    t = interleave(variants, 5, "base", controls=["n1"], clock=clock)
    assert t.speedup("n1") == pytest.approx(1.0) and t.speedup("n6") == pytest.approx(4.0)
    assert t.seconds("base") == 4.0 and not t.unreliable


def test_repeat_baseline_runs_it_half_a_rotation_away_and_makes_it_a_control():
    clock = FakeClock()
    variants = {n: clock.variant(n, c) for n, c in (("base", 2.0), ("a", 1.0), ("b", 1.0),
                                                    ("c", 1.0))}
    t = interleave(variants, 3, "base", repeat_baseline=True, clock=clock, keep=True)
    first = [name for name, r in clock.ran if r == 0]
    assert first == ["base", "a", "b", "base", "c"]  # the same callable, timed twice
    assert t.controls == ("base (again)",) and t.speedup("base (again)") == 1.0
    assert "base (again)" in t.times and t.outputs["base (again)"][0] == "base@0"


def test_spread_median_range_and_quartiles():
    s = Spread.of([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (s.median, s.lo, s.hi, s.q1, s.q3) == (3.0, 1.0, 5.0, 2.0, 4.0)
    one = Spread.of([2.0])
    assert (one.median, one.lo, one.hi, one.q1, one.q3) == (2.0, 2.0, 2.0, 2.0, 2.0)


def test_speedup_is_the_median_of_per_round_ratios_not_a_ratio_of_medians():
    times = {"base": [10.0, 10.0, 30.0], "x": [5.0, 5.0, 10.0]}
    t = summarize(times, "base")
    assert t.speedups["x"].median == 2.0 and t.speedups["x"].hi == 3.0
    assert t.describe("x") == "2.00x (2.00-3.00 over 3 rounds)"


def test_a_control_off_1x_beyond_the_noise_flags_the_run():
    # interval=1 at ~3.3x with a tight scatter: not noise
    times = {"base": [10.0, 10.0, 10.0, 10.0], "n1": [3.0, 3.1, 2.9, 3.0],
             "n3": [4.0, 4.0, 4.0, 4.0]}
    t = summarize(times, "base", controls=["n1"])
    assert t.unreliable and len(t.reasons) == 1 and "n1 ran at 3.33x" in t.reasons[0]
    assert t.verdict().startswith("UNRELIABLE timing: n1 ran at 3.33x")
    assert t.to_json()["unreliable"] is True


def test_a_noisy_control_whose_median_is_within_its_noise_passes_with_a_wide_band():
    # a busy machine: the control's per-round speedups scatter from 0.7 to 1.4x
    speeds = [0.7, 1.4, 1.0, 1.1, 0.9]
    times = {"base": [10.0] * 5, "n1": [10 / s for s in speeds]}
    t = summarize(times, "base", controls=["n1"])
    assert t.noise == pytest.approx(0.35) and t.band == pytest.approx(0.35)
    assert not t.unreliable and "+-35%" in t.verdict()
    # the same scatter shifted to a median of 1.5x is more than noise
    shifted = {"base": times["base"], "n1": [10 / (s + 0.5) for s in speeds]}
    assert summarize(shifted, "base", controls=["n1"]).unreliable


def test_a_control_too_noisy_to_time_anything_flags_the_run():
    # the eval's DPM run beside two test suites: per-round control speedups 0.3x .. 4.3x,
    # median 1.0x -- within its own noise, but a +-198% band says nothing of any speedup
    speeds = [0.3, 1.0, 4.3, 0.9, 1.1]
    times = {"base": [10.0] * 5, "again": [10 / s for s in speeds], "n3": [4.0] * 5}
    t = summarize(times, "base", controls=["again"])
    assert t.noise == pytest.approx(2.0) and t.unreliable
    assert "spread +-200% (more than +-50%)" in t.reasons[0]
    assert t.verdict().startswith("UNRELIABLE timing: the controls' per-round speedups")


def test_floor_absorbs_a_small_real_difference_of_a_control():
    times = {"base": [10.0] * 4, "n1": [10 / 1.06] * 4}  # a steady 1.06x, no scatter
    assert not summarize(times, "base", controls=["n1"]).unreliable
    assert summarize(times, "base", controls=["n1"], floor=0.02).unreliable


def test_too_few_rounds_are_flagged_and_ragged_times_refused():
    t = summarize({"base": [1.0, 1.0], "x": [0.5, 0.5]}, "base")
    assert t.unreliable and "2 round(s) cannot measure the noise" in t.reasons[0]
    with pytest.raises(ValueError, match="one time per round"):
        summarize({"base": [1.0, 1.0, 1.0], "x": [0.5, 0.5]}, "base")


def test_drift_flags_a_row_whose_baseline_ran_on_a_changed_machine():
    from fora_fx.bench.timing import drift

    steady = {"eager": [1.0, 1.02, 0.98], "compiled": [1.01, 0.99, 1.0], "fora": [1.0, 1.0, 1.03]}
    assert drift(steady) == []
    slow = {**steady, "fora": [1.5, 1.52, 1.49]}  # the machine got busy for this row
    reasons = drift(slow)
    assert len(reasons) == 1 and "rounds of fora" in reasons[0] and "1.50x" in reasons[0]
    # a row whose own baseline times scatter that much is noise, not drift
    assert drift({**steady, "fora": [0.7, 1.8, 1.25]}) == []


def test_bench_reliability_collects_row_reasons_and_drift():
    from fora_fx.bench.report import reliability
    from fora_fx.bench.setup import Row

    def row(method, eager_times):
        other = "eager (again)" if method == "eager" else method
        t = summarize({"eager": eager_times, other: [x / 2 for x in eager_times]}, "eager")
        return Row(method, None, timing=t.to_json())

    rows = [row("eager", [1.0, 1.0, 1.0]), row("compiled", [1.0, 1.01, 0.99])]
    assert reliability(rows) == {"unreliable": False, "reasons": []}
    rows.append(row("fora_fx", [2.0, 2.0, 2.0]))
    check = reliability(rows)
    assert check["unreliable"] and "rounds of fora_fx N=-" in check["reasons"][0]


def test_unguarded_leaves_dynamos_stance_as_it_found_it():
    # torch.compiler.set_stance applies when called: probing whether this torch can skip
    # guards must not leave every later call unguarded (it made fora_fx rows fail with
    # "Recompilation triggered with skip_guard_eval_unsafe stance").
    import torch._dynamo.eval_frame as frames

    from fora_fx.bench.setup import Setup
    from fora_fx.bench.timing import unguarded

    calls = []
    t = unguarded(lambda: calls.append(frames._stance.skip_guard_eval_unsafe),
                  Setup(model="tiny", device="cpu", repeats=3))
    if t is None:
        pytest.skip("this torch cannot skip guard evaluation")
    assert sorted(calls) == [False] * 3 + [True] * 3  # guarded and unguarded loops
    assert frames._stance.skip_guard_eval_unsafe is False
