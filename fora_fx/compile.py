"""Compile stage: hand each rewritten variant to Inductor (or run it un-compiled); the
result, a `CompiledPair`, is plain data the runtime runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import GraphModule

from .config import ForaConfig
from .passes import Batched, LocateResult, Site


@dataclass(frozen=True)
class BufferSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def allocate(self) -> torch.Tensor:
        # Persistent, static-address, written in place by fora::store: outputs of a CUDA-graph
        # replay are overwritten by the next replay, so they cannot serve as the cache.
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)


@dataclass(eq=False)  # identity: a pair keys its cache buffers
class CompiledPair:
    """The two compiled variants of one captured graph. It holds no model state: Dynamo
    shares compiled code between model instances whose guards match, so `entry` (what Dynamo
    calls) finds the calling model's Runtime on each call (fora_fx/runtime.py)."""

    refresh: Callable[..., Any]
    reuse: Callable[..., Any]
    specs: list[BufferSpec]
    located: LocateResult
    sites: list[Site]
    graphs: dict[str, GraphModule] = field(default_factory=dict)  # readable, for explain
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # variant -> pass -> n
    batched: dict[str, list[Batched]] = field(default_factory=dict)  # variant -> block runs
    # variant -> the input indices of the parameters each of its stacked inputs holds
    stack_groups: dict[str, list[tuple[int, ...]]] = field(
        default_factory=lambda: {"refresh": [], "reuse": []})
    param_index: int | None = None  # an input that identifies the model (a parameter)
    clock: int | None = None  # which buffer is the forecast clock (passes/forecast.py)
    # Whether Dynamo's frame around this graph has Python side effects on existing objects
    # (None: unknown); fora_fx/fastpath.py says what it allows.
    frame_effects: bool | None = None
    entry: Callable[..., Any] | None = None  # set by the backend: routes to the Runtime

    def start_cold(self, buffers: Sequence[torch.Tensor]) -> None:
        """Before a refresh that starts a cache (nothing from this generation in `buffers`):
        a forecast keeps its first factor only (a device write, no sync)."""
        if self.clock is not None:
            buffers[self.clock].zero_()

    @property
    def pruned(self) -> int:
        return self.counts.get("reuse", {}).get("prune", 0)


def inductor_patches(mode: str | None) -> dict[str, Any]:
    """Inductor config for a torch.compile mode, scoped to our compile calls (never global)."""
    if mode in (None, "default"):
        return {}
    import torch._inductor

    return dict(torch._inductor.list_mode_options(mode))


def fusion_limit_patches(limit: int | None) -> dict[str, Any]:
    """Inductor config bounding the distinct buffers of one fused kernel (if this torch has
    the knob; it is a performance heuristic, so without it the compile goes on unbounded)."""
    import torch._inductor.config as inductor_config

    if limit is None or not hasattr(inductor_config, "max_fusion_unique_io_buffers"):
        return {}
    return {"max_fusion_unique_io_buffers": limit}


def store_placement_patches(buffers: Sequence[int]) -> dict[str, Any]:
    """Inductor config for the refresh variant: `StoresNearValues` over the cache buffers at
    these input positions, after whatever post-grad pass is configured already."""
    import torch._inductor.config as inductor_config

    if not buffers:
        return {}
    return {"post_grad_custom_post_pass": StoresNearValues(
        buffers, inductor_config.post_grad_custom_post_pass)}


class StoresNearValues(CustomGraphPass):
    """Post-grad pass: moves each cache store next to the value it stores.

    AOTAutograd applies input mutations at the end of the graph, so each `copy_` into a cache
    buffer sits after the whole forward, far from the value it copies. Inductor fuses two
    kernels that read the same buffer only if they are at most 64 nodes apart
    (`Scheduler.are_long_distant_nodes`), so every store but the last block's became a kernel of
    its own that reads the value a second time: for DiT-XL/2, 55 extra launches per refresh
    step and ~1 GB of extra traffic at B=16 (docs/benchmarks.md). Next to its value the store
    fuses into the kernel that already reads it (the block's residual add and norm). A
    refresh graph never reads its cache buffers, so an earlier write is the same program; a
    store whose buffer is read by anything else stays where it is.
    """

    def __init__(self, buffers: Sequence[int], then: Any = None):
        self.buffers = tuple(buffers)
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        if self.then is not None:
            self.then(graph)
        placeholders = list(graph.find_nodes(op="placeholder"))
        targets = {placeholders[i] for i in self.buffers if i < len(placeholders)}
        for node in list(graph.find_nodes(op="call_function",
                                          target=torch.ops.aten.copy_.default)):
            dst, src = node.args[0], node.args[1]
            if dst in targets and isinstance(src, torch.fx.Node) and len(dst.users) == 1 \
                    and not node.users and src.op != "placeholder":
                src.append(node)

    def uuid(self) -> Any:
        then = None
        if self.then is not None:
            then = self.then.uuid() if hasattr(self.then, "uuid") else None
            if then is None:  # Inductor does not cache a graph whose pass cannot say what
                return None   # it is; chained to such a pass, neither can this one
        return (get_hash_for_files((__file__,)), self.buffers, then)


def compile_variant(
    gm: GraphModule,
    example_inputs: Sequence[torch.Tensor],
    config: ForaConfig,
    patches: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """Returns a callable taking the variant's flat inputs (the graph's inputs + buffers).

    `patches`: extra Inductor config for this variant only (on top of the mode's)."""
    if config.compiler == "eager":
        return gm
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, list(example_inputs))
    from torch._inductor.compile_fx import compile_fx

    options = {**inductor_patches(config.mode), **(patches or {})}
    compiled = compile_fx(gm, list(example_inputs), config_patches=options)
    if not callable(compiled):  # compile_fx's annotation also covers AOT-export results
        raise TypeError(f"Inductor returned {type(compiled).__name__}, not a callable")
    return compiled
