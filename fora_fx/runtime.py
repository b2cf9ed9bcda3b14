"""Run stage: the host-side dispatcher and the one object holding all mutable FORA state.

`Runtime` owns the step counter and knows which compiled graph holds the current
generation's cache. `CompiledPair` is what the backend hands back to Dynamo for one captured
graph: the refresh and reuse variants plus their cache buffers. Each call picks a variant
from a Python int, so there is no device->host sync, no recompile and no graph break.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

from .config import ForaConfig
from .passes import LocateResult, Site


@dataclass
class Stats:
    calls: int = 0
    refreshes: int = 0
    reuses: int = 0
    compiles: int = 0  # captured graphs turned into a refresh + reuse pair
    history: list[bool] = field(default_factory=list)  # per call: True = refreshed (last 4096)


class CompiledPair:
    """The two compiled variants of one captured graph and the cache buffers they share."""

    def __init__(
        self,
        runtime: Runtime,
        refresh: Callable[..., Any],
        reuse: Callable[..., Any],
        buffers: Sequence[torch.Tensor],
        located: LocateResult,
        sites: Sequence[Site],
        graphs: dict[str, GraphModule],
    ):
        self.runtime = runtime
        self.refresh = refresh
        self.reuse = reuse
        self.buffers = list(buffers)
        self.located = located
        self.sites = list(sites)
        self.graphs = graphs  # readable copies for explain(); the compiled ones are consumed

    @property
    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def __call__(self, *args: Any) -> Any:
        return self.runtime.run(self, args)


class Runtime:
    """Step counter, schedule and cache validity for one transformed model."""

    def __init__(self, config: ForaConfig):
        self.config = config
        self.step = 0
        self.generation = 0
        self.owner: CompiledPair | None = None  # whose buffers hold this generation's cache
        self.pairs: list[CompiledPair] = []
        self.stats = Stats()
        self._lock = threading.Lock()

    def register(self, pair: CompiledPair) -> None:
        self.pairs.append(pair)
        self.stats.compiles += 1

    def run(self, pair: CompiledPair, args: Sequence[Any]) -> Any:
        if not pair.buffers and pair.sites:
            raise RuntimeError("fora_fx: this model's cache was released by fora_fx.restore")
        # One step at a time: two threads interleaving steps would corrupt both schedules.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "fora_fx: a transformed model was called while another call was running "
                "(another thread?). FORA state is per generation; use one transformed model "
                "per thread (fora_fx.transform each copy)."
            )
        try:
            # A graph other than the owner (new shape / dtype / device) has no valid cache.
            refresh = self.config.refreshes(self.step) or self.owner is not pair
            if refresh:
                self.owner = None  # a refresh that raises half-way leaves no valid cache
                out = pair.refresh(*args, *pair.buffers)
                self.owner = pair
            else:
                out = pair.reuse(*args, *pair.buffers)
        except BaseException:
            self.owner = None
            raise
        else:
            self._advance(refresh)
        finally:
            self._lock.release()
        return out

    def _advance(self, refreshed: bool) -> None:
        s = self.stats
        s.calls += 1
        s.refreshes += refreshed
        s.reuses += not refreshed
        s.history.append(refreshed)
        del s.history[:-4096]
        self.step += 1
        if self.config.num_steps is not None and self.step >= self.config.num_steps:
            self.reset()

    def reset(self) -> None:
        """The next call is step 0 of a new generation; no cached value is read again."""
        self.step = 0
        self.generation += 1
        self.owner = None

    def release(self) -> None:
        """Frees every cache buffer (fora_fx.restore)."""
        self.reset()
        for pair in self.pairs:
            pair.buffers = []
        self.pairs = []
