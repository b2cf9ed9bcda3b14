"""Run stage: the host-side dispatcher and the one object holding all mutable FORA state.

`CompiledPair` is what the backend hands back to Dynamo for one captured graph: the refresh
and reuse variants and what their cache buffers look like. It holds no model state, because
Dynamo shares compiled code between model instances whose guards match (same class, shapes
and backend). The state lives in a `Runtime` (one per transformed model): step counter,
cache buffers, and which graph's buffers hold the current generation. Each call finds its
runtime (the ForaModule being called, else the model whose parameters were passed in) and
picks a variant from a Python int: no device->host sync, no recompile, no graph break.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils.weak import WeakIdKeyDictionary

from .config import ForaConfig
from .passes import LocateResult, Site


@dataclass(frozen=True)
class BufferSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def allocate(self) -> torch.Tensor:
        # Persistent, static-address, written in place by fora::store: outputs of a CUDA-graph
        # replay are overwritten by the next replay, so they cannot serve as the cache.
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


class CompiledPair:
    """The two compiled variants of one captured graph."""

    def __init__(
        self,
        config: ForaConfig,
        refresh: Callable[..., Any],
        reuse: Callable[..., Any],
        specs: Sequence[BufferSpec],
        located: LocateResult,
        sites: Sequence[Site],
        graphs: dict[str, GraphModule],
        param_index: int | None,
    ):
        self.config = config
        self.refresh = refresh
        self.reuse = reuse
        self.specs = list(specs)
        self.located = located
        self.sites = list(sites)
        self.graphs = graphs  # readable copies for explain(); the compiled ones are consumed
        self.param_index = param_index  # an input that identifies the model (a parameter)
        self._fallback: Runtime | None = None

    @property
    def cache_bytes(self) -> int:
        return sum(s.dtype.itemsize * int(torch.Size(s.shape).numel()) for s in self.specs)

    def __call__(self, *args: Any) -> Any:
        runtime = getattr(_active, "runtime", None)
        if runtime is None:
            if self.param_index is not None:
                runtime = runtime_for(args[self.param_index], self.config)
            else:  # a model without parameters: nothing to tell instances apart by
                self._fallback = self._fallback or Runtime(self.config)
                runtime = self._fallback
        return runtime.run(self, args)


@dataclass
class Stats:
    calls: int = 0
    refreshes: int = 0
    reuses: int = 0
    history: list[bool] = field(default_factory=list)  # per call: True = refreshed (last 4096)


class Runtime:
    """Step counter, schedule, cache buffers and cache validity for one transformed model."""

    def __init__(self, config: ForaConfig):
        self.config = config
        self.step = 0
        self.generation = 0
        self.owner: CompiledPair | None = None  # whose buffers hold this generation's cache
        self.buffers: dict[CompiledPair, list[torch.Tensor]] = {}
        self.released = False
        self.stats = Stats()
        self._lock = threading.Lock()

    @property
    def pairs(self) -> list[CompiledPair]:
        return list(self.buffers)

    @property
    def cache_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.buffers.values() for b in bufs)

    def run(self, pair: CompiledPair, args: Sequence[Any]) -> Any:
        if self.released:
            raise RuntimeError("fora_fx: this model's cache was released by fora_fx.restore")
        # One step at a time: two threads interleaving steps would corrupt both schedules.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "fora_fx: a transformed model was called while another call was running "
                "(another thread?). FORA state is per generation; use one transformed model "
                "per thread (fora_fx.transform each copy)."
            )
        try:
            buffers = self.buffers.get(pair)
            if buffers is None:
                buffers = self.buffers[pair] = [s.allocate() for s in pair.specs]
            # A graph other than the owner (new shape / dtype / device) has no valid cache.
            refresh = self.config.refreshes(self.step) or self.owner is not pair
            if refresh:
                self.owner = None  # a refresh that raises half-way leaves no valid cache
                out = pair.refresh(*args, *buffers)
                self.owner = pair
            else:
                out = pair.reuse(*args, *buffers)
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
        """Frees every cache buffer (fora_fx.restore); later calls raise."""
        self.reset()
        self.buffers = {}
        self.released = True


# The runtime of the ForaModule being called, and its module-id -> name map, for this thread.
_active = threading.local()


@contextlib.contextmanager
def active(runtime: Runtime, paths: Mapping[str, str]) -> Iterator[None]:
    prev = getattr(_active, "runtime", None), getattr(_active, "paths", None)
    _active.runtime, _active.paths = runtime, paths
    try:
        yield
    finally:
        _active.runtime, _active.paths = prev


def active_paths() -> Mapping[str, str] | None:
    return getattr(_active, "paths", None)


# Runtimes of models compiled by name (torch.compile(m, backend="fora")), keyed by one of the
# model's parameters, so that fora_fx.reset(model) finds them and each model keeps its own.
_RUNTIMES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def runtime_for(param: torch.Tensor, config: ForaConfig) -> Runtime:
    by_config = _RUNTIMES.get(param)
    if by_config is None:
        by_config = _RUNTIMES[param] = {}
    runtime = by_config.get(config)
    if runtime is None:
        runtime = by_config[config] = Runtime(config)
    return runtime


def runtimes_of(module: torch.nn.Module) -> list[Runtime]:
    found: list[Runtime] = []
    for p in module.parameters():
        for rt in (_RUNTIMES.get(p) or {}).values():
            if rt not in found:
                found.append(rt)
    return found
