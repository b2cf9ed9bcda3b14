"""What Dynamo calls, and how it finds the FORA state of the model being called.

`CompiledPair` is what the backend hands back to Dynamo for one captured graph: the refresh
and reuse variants and what their cache buffers look like. It holds no model state, because
Dynamo shares compiled code between model instances whose guards match (same class, shapes
and backend). Each call finds its model's `Runtime` (fora_fx/runtime.py): the ForaModule
being called (`active`), else the model whose parameters were passed in (`runtime_for`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils.weak import WeakIdKeyDictionary

from . import direct
from .config import ForaConfig
from .passes import Batched, LocateResult, Site
from .runtime import Runtime


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
        pruned: int = 0,
        stack_groups: dict[str, list[tuple[int, ...]]] | None = None,
        batched: dict[str, list[Batched]] | None = None,
    ):
        self.config = config
        self.refresh = refresh
        self.reuse = reuse
        self.specs = list(specs)
        self.located = located
        self.sites = list(sites)
        self.graphs = graphs  # readable copies for explain(); the compiled ones are consumed
        self.param_index = param_index  # an input that identifies the model (a parameter)
        self.pruned = pruned  # chunked Linears narrowed to their live chunks in the reuse graph
        # variant -> the input indices of the parameters each of its stacked inputs holds
        self.stack_groups = stack_groups or {"refresh": [], "reuse": []}
        self.batched = batched or {}  # variant -> the runs of blocks batch_blocks batched
        # Whether Dynamo's frame around this graph has Python side effects on existing
        # objects (set by the backend; None: unknown). fora_fx/direct.py says what it allows.
        self.frame_effects: bool | None = None
        self._fallback: Runtime | None = None

    def __call__(self, *args: Any) -> Any:
        runtime = getattr(_active, "runtime", None)
        if runtime is None:
            if self.param_index is not None:
                runtime = runtime_for(args[self.param_index], self.config)
            else:  # a model without parameters: nothing to tell instances apart by
                self._fallback = self._fallback or Runtime(self.config)
                runtime = self._fallback
        out = runtime.run(self, args)
        direct.record(self, args, out)
        return out


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


def active_runtime() -> Runtime | None:
    return getattr(_active, "runtime", None)


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
