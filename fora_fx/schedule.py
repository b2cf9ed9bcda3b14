"""Explicit schedules: which steps of a generation recompute, given as data (issue 18, part 2).

`Schedule({20: (0, 1, 4, 9, 15, 19)})` lists, per generation length, the full (refresh)
steps; every other step replays the cache. `ForaConfig(schedule=...)` uses it instead of the
interval rule (`ForaConfig.refreshes` stays the one place that decides a step). The schedule
is fixed before sampling: the runtime decides from a Python int, as with the interval rule,
so there is no per-step measurement and no device->host sync at sampling time, and CUDA
graphs stay whole.

`fora_fx.calibrate` (fora_fx/calibrate.py) measures a model and returns one; the choice of
steps from a measured curve lives here (`choose`), pure Python, so that other cost models
(part 1's Taylor forecasting replays a forecast, not the last value) can reuse the search.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


def _steps(n: object, steps: object) -> tuple[int, ...]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Schedule: a generation length must be an int >= 1, got {n!r}")
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise TypeError(f"Schedule: the full steps of {n} steps must be a sequence of ints, "
                        f"e.g. (0, 3, 6), got {steps!r}")
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise TypeError(f"Schedule: full steps must be ints, got {bad!r} (for {n} steps)")
    out = tuple(sorted(steps))
    dup = sorted({s for s in out if out.count(s) > 1})
    if dup:
        raise ValueError(f"Schedule: step(s) {dup} listed twice for {n} steps; each full "
                         "step is listed once")
    outside = [s for s in out if not 0 <= s < n]
    if outside:
        raise ValueError(f"Schedule: step(s) {outside} outside a {n}-step generation; valid "
                         f"steps are 0 .. {n - 1}")
    if not out or out[0] != 0:
        raise ValueError(f"Schedule: step 0 must be a full step (listed for {n} steps: "
                         f"{list(out)}): a generation's first step has no cache to replay")
    return out


def _listing(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps))


@dataclass(frozen=True, eq=False)
class Schedule:
    """Full (refresh) steps per generation length: `Schedule({20: (0, 1, 4, 9, 15, 19)})`.

    full:    generation length -> the steps (0-based) that recompute every site; step 0 is
             always one. Other steps replay the cache of the last full step before them.
    changes: what `fora_fx.calibrate` measured, per generation length: the mean relative
             change of the cached sites' outputs at each step (index 0 is 0.0; NaN where
             nothing was measured). Kept for printing and saving; not part of equality.

    A generation length the schedule lacks is an error at the model's first call of such a
    generation (it names the lengths it has), never a silent fallback to the interval rule.
    Save it with `to_json()` and load it with `Schedule.from_json(text)`.
    """

    full: Mapping[int, tuple[int, ...]]
    changes: Mapping[int, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.full, Mapping) or not self.full:
            raise TypeError("Schedule needs a non-empty mapping of generation length -> full "
                            f"steps, e.g. Schedule({{20: (0, 5, 10, 15, 19)}}), got {self.full!r}")
        full = {n: _steps(n, self.full[n]) for n in sorted(self.full)}
        changes = {int(n): tuple(float(c) for c in curve) for n, curve in self.changes.items()}
        for n, curve in changes.items():
            if n not in full or len(curve) != n:
                raise ValueError(f"Schedule.changes[{n}] must be {n} values of a length the "
                                 f"schedule lists ({sorted(full)}), got {len(curve)}")
        # Read-only views: the schedule is part of a frozen, hashable ForaConfig.
        object.__setattr__(self, "full", MappingProxyType(full))
        object.__setattr__(self, "changes", MappingProxyType(changes))
        object.__setattr__(self, "_sets", {n: frozenset(s) for n, s in full.items()})

    def full_set(self, num_steps: int | None) -> frozenset[int]:
        """The full steps of a `num_steps`-step generation, for ForaConfig.refreshes (the one
        place that decides a step); a length the schedule lacks raises, naming those it has."""
        sets: dict[int, frozenset[int]] = self.__dict__["_sets"]
        found = sets.get(num_steps) if num_steps is not None else None
        if found is None:
            lengths = ", ".join(map(str, sorted(sets)))
            if num_steps is None:
                raise ValueError(
                    "fora_fx: ForaConfig.schedule lists full steps per generation length "
                    f"({lengths} steps), and this model's generation length is unknown: pass "
                    "ForaConfig(num_steps=...) for a model (a pipeline's scheduler supplies it)")
            raise ValueError(
                f"fora_fx: ForaConfig.schedule has full steps for generations of {lengths} "
                f"steps, not {num_steps}: add {num_steps} (e.g. fora_fx.calibrate with a "
                f"{num_steps}-step run) or sample with one of those lengths")
        return found

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and dict(self.full) == dict(other.full)

    def __hash__(self) -> int:
        return hash(tuple(self.full.items()))

    def __repr__(self) -> str:
        return f"Schedule({dict(self.full)!r})"

    def __str__(self) -> str:
        return "; ".join(f"{n} steps -> full at {_listing(s)}" for n, s in self.full.items())

    def describe(self) -> str:
        """The schedule and, where calibrated, the measured change per step."""
        lines = [str(self)]
        for n, curve in self.changes.items():
            full = self.full[n]
            lines.append(f"measured change per step ({n} steps; * = full):")
            lines += [f"  {k:>3}{'*' if k in full else ' '} {c:.4g}" for k, c in enumerate(curve)]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; `Schedule.from_dict` reads it back."""
        out: dict[str, Any] = {"full": {str(n): list(s) for n, s in self.full.items()}}
        if self.changes:
            out["changes"] = {str(n): [None if math.isnan(c) else c for c in curve]
                              for n, curve in self.changes.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        changes = data.get("changes") or {}
        return cls({int(n): tuple(s) for n, s in data["full"].items()},
                   {int(n): tuple(math.nan if c is None else c for c in curve)
                    for n, curve in changes.items()})

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))


# -- choosing full steps from a measured curve ----------------------------------------------
#
# Cost model (FORA replays the last full step's output): replaying full step j's cache at
# step k > j costs about how far the sites' outputs moved since j, bounded by the triangle
# inequality by the accumulated per-step change, e(j, k) = d[j+1] + ... + d[k]. A schedule
# costs the sum of e over its replayed steps. Only consecutive changes are needed, so
# calibration keeps one previous output per site, not all of them. Every step weighs the
# same: the last step is not forced full (FORA's refresh_last comes from the official code
# counting down, not from a measurement); the search keeps it full where that pays.


def _forced(changes: Sequence[float]) -> list[int]:
    """Steps that must be full: 0, and steps where nothing was measured (NaN: no site had a
    previous output, e.g. a second expert's first step, which the runtime recomputes)."""
    return [0] + [k for k in range(1, len(changes)) if math.isnan(changes[k])]


def choose(changes: Sequence[float], budget: int | float) -> tuple[int, ...]:
    """Full steps for a curve of per-step changes (`changes[k]`: step k vs step k-1).

    budget int K:   exactly K full steps minimising the total replay cost (dynamic
                    programming over segments, O(K n^2): n is a step count, <= a few hundred).
    budget float b: the fewest full steps such that every replayed step's accumulated change
                    e(j, k) stays <= b: greedily, each step is replayed while the change
                    accumulated since the last full step stays within b. That is optimal for
                    this cost (pushing a full step later never makes a later one needed
                    earlier).
    """
    n = len(changes)
    forced = _forced(changes)
    d = [0.0 if math.isnan(c) else float(c) for c in changes]
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"calibrate: budget must be an int (full steps) or a float (error "
                        f"bound), got {budget!r}")
    if isinstance(budget, float):
        if not budget > 0 or math.isinf(budget):
            raise ValueError(f"calibrate: an error bound must be a finite float > 0, got {budget}")
        full, acc = [0], 0.0
        for k in range(1, n):
            acc += d[k]
            if acc > budget or k in forced:
                full.append(k)
                acc = 0.0
        return tuple(full)
    if not len(forced) <= budget <= n:
        raise ValueError(f"calibrate: budget={budget} full steps for a {n}-step generation; "
                         f"valid budgets are {len(forced)} .. {n}"
                         + (f" (steps {forced} must be full)" if len(forced) > 1 else ""))
    # seg(a, b): cost of full step a replayed over a+1..b = sum_{i=a+1..b} d[i] * (b - i + 1)
    p = [0.0] * (n + 1)  # p[i] = d[1] + ... + d[i]; q[i] = 1*d[1] + ... + i*d[i]
    q = [0.0] * (n + 1)
    nf = [0] * (n + 1)  # forced steps among 1..i
    for i in range(1, n):
        p[i], q[i], nf[i] = p[i - 1] + d[i], q[i - 1] + i * d[i], nf[i - 1] + (i in forced)

    def seg(a: int, b: int) -> float:
        if nf[b] - nf[a] > 0:  # a forced step would be replayed
            return math.inf
        return (b + 1) * (p[b] - p[a]) - (q[b] - q[a])

    # g[c][a]: least cost of steps a..n-1 with a full and c full steps from a on.
    inf = math.inf
    g = [[inf] * n for _ in range(budget + 1)]
    nxt = [[-1] * n for _ in range(budget + 1)]
    for a in range(n):
        g[1][a] = seg(a, n - 1)
    for c in range(2, budget + 1):
        for a in range(n - c, -1, -1):
            best, arg = inf, -1
            for b in range(a + 1, n - c + 2):  # the next full step; ties: the earliest
                cost = seg(a, b - 1) + g[c - 1][b]
                if cost < best:
                    best, arg = cost, b
            g[c][a], nxt[c][a] = best, arg
    full, a = [0], 0
    for c in range(budget, 1, -1):
        a = nxt[c][a]
        full.append(a)
    return tuple(full)
