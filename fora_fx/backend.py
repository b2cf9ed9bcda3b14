"""The "fora" Dynamo backend: locate -> rewrite -> verify -> compile -> dispatcher.

`build_pair` is the ~10 lines that run the passes. `torch.compile(m, backend="fora")` finds
`fora_backend` through the `torch_dynamo_backends` entry point; importing fora_fx also
registers it, guarded so that both paths work in either order (registering a name the
entry point already declares raises "duplicate name: fora").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from .compile import compile_variant, fusion_limit_patches, store_placement_patches
from .config import ForaConfig
from .direct import frame_effects
from .dispatch import BufferSpec, CompiledPair, active_paths, active_runtime
from .passes import (
    LocateResult,
    Refusal,
    Site,
    batch_blocks,
    clone,
    elide_loads,
    locate,
    lower_stores,
    prune_chunked_linears,
    specialize,
    stack_names,
    verify,
)


class NoSitesError(ValueError):
    """Raised when a model has nothing FORA can cache."""


def describe_refusals(located: LocateResult, config: ForaConfig) -> str:
    lines = [f"  {r.module_path} ({r.kind}): {r.reason}" for r in located.refused]
    skipped = [s for s in located.sites
               if s.kind not in config.sites and config.excluded_by(s.module_path) is None]
    lines += [f"  {s.module_path} ({s.kind}): not in config.sites={config.sites}" for s in skipped]
    return "\n".join(lines) if lines else "  (no attention or MLP region found)"


def _check_single_graph(gm: GraphModule) -> None:
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is not None and getattr(reason, "graph_break", False):
        raise RuntimeError(
            "fora needs the whole forward as one graph, but Dynamo broke it "
            f"({reason.reason}). Compile with fullgraph=True to see where, and remove the break."
        )


def build_pair(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    config: ForaConfig,
    module_paths: Mapping[str, str] | None = None,
    earlier_sites: Sequence[Site] = (),
) -> CompiledPair:
    located = locate(gm, module_paths, config.sites, earlier_sites)
    sites = []
    for s in located.sites:
        pattern = config.excluded_by(s.module_path)
        if pattern is not None:
            located.refused.append(Refusal(s.module_path, s.kind, f"excluded by {pattern!r}"))
        elif s.kind in config.sites:
            sites.append(s)
    if not sites:
        if not config.fullgraph:  # one piece of a piecewise model: it runs as it is
            plain = compile_variant(gm, example_inputs, config)
            return CompiledPair(config, refresh=plain, reuse=plain, specs=[], located=located,
                                sites=[], graphs={}, param_index=None)
        raise NoSitesError(
            "fora_fx found no attention or MLP site to cache in this model:\n"
            + describe_refusals(located, config)
        )
    refresh = specialize(gm, sites, refresh=True)
    reuse = specialize(gm, sites, refresh=False)
    pruned = prune_chunked_linears(reuse)  # adaLN: only the gates are live on reuse steps
    verify(gm, refresh, sites, refresh=True)
    verify(gm, reuse, sites, refresh=False)
    batched = {}
    if config.batch_blocks:  # after verify: it checks sites, which batching does not touch
        batched = {"refresh": batch_blocks(refresh, module_paths),
                   "reuse": batch_blocks(reuse, module_paths)}
    graphs = {"refresh": clone(refresh), "reuse": clone(reuse)}
    if config.compiler != "eager":  # eager runs the ops as written, for debugging
        lower_stores(refresh)
        elide_loads(reuse)

    specs = _buffer_specs(gm, sites)
    index = {n.name: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    groups = {name: [tuple(index[m] for m in members) for _, members in stack_names(variant)]
              for name, variant in (("refresh", refresh), ("reuse", reuse))}
    for variant in (refresh, reuse):
        _mark_cache_inputs(variant)
    buffers = [s.allocate() for s in specs]
    stacked = {name: [_example_stack([example_inputs[i] for i in g]) for g in gs]
               for name, gs in groups.items()}
    params = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
    reuse_patches = fusion_limit_patches(config.reuse_fusion_limit)
    first = len(example_inputs)  # the cache buffers follow the graph's own inputs
    store_patches = store_placement_patches(range(first, first + len(buffers)))
    return CompiledPair(
        config,
        refresh=compile_variant(refresh, [*example_inputs, *buffers, *stacked["refresh"]],
                                config, store_patches),
        reuse=compile_variant(reuse, [*example_inputs, *buffers, *stacked["reuse"]], config,
                              reuse_patches),
        specs=specs,
        located=located,
        sites=sites,
        graphs=graphs,
        param_index=params[0] if params else None,
        pruned=pruned,
        stack_groups=groups,
        batched=batched,
    )


def _example_stack(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """A stand-in for a parameter stack, for compiling only: a fake tensor of Dynamo's fake
    mode (no memory). The parameters are re-homed into the real stack by the runtime on the
    first call (fora_fx/stacks.py); doing it here, after Dynamo recorded their layout and
    before AOTAutograd reads it, would contradict what Dynamo recorded."""
    from torch._guards import detect_fake_mode

    p = params[0]
    mode = detect_fake_mode()  # None outside Dynamo (a hand-built graph): a real allocation
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty((len(params), *p.shape), dtype=p.dtype, device=p.device)


def _buffer_specs(gm: GraphModule, sites: Sequence[Any]) -> list[BufferSpec]:
    nodes = {n.name: n for n in gm.graph.nodes}
    specs = []
    for site in sites:
        for out in site.outputs:
            val = nodes[out].meta["example_value"]
            specs.append(BufferSpec(tuple(int(s) for s in val.shape), val.dtype, val.device))
    return specs


def _mark_cache_inputs(gm: GraphModule) -> None:
    """Gives cache and stack placeholders a Dynamo source, so AOTAutograd treats them as
    static inputs (their addresses never change between calls)."""
    from torch._dynamo.source import ConstantSource

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if not any(hasattr(n, "_dynamo_source") for n in placeholders):
        return  # not a Dynamo graph (tests may build one by hand): nothing to match
    for n in placeholders:
        if "fora_cache" in n.meta or "fora_stack" in n.meta:
            n._dynamo_source = ConstantSource(n.name)  # type: ignore[attr-defined]


class ForaBackend:
    """A configured backend: `torch.compile(model, backend=fora_fx.backend(config))`.

    Stateless: the compiled pair it returns finds the calling model's state at run time, so
    one backend may serve many models (and Dynamo may share the compiled code among them).
    """

    def __init__(self, config: ForaConfig):
        self.config = config

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> CompiledPair:
        earlier: list[Site] = []
        if self.config.fullgraph:
            _check_single_graph(gm)
        else:
            runtime = active_runtime()
            if runtime is None:
                raise ValueError(
                    "ForaConfig(fullgraph=False) works through fora_fx.transform only, which "
                    "decides each model call's step once for all of its graphs; "
                    "torch.compile(backend='fora') sees graphs, not model calls"
                )
            # Graphs run in order: what the model's earlier graphs cache.
            earlier = [s for p in runtime.pairs for s in p.sites]
        pair = build_pair(gm, example_inputs, self.config, active_paths(), earlier)
        pair.frame_effects = frame_effects()
        return pair

    def __repr__(self) -> str:
        return f"ForaBackend({self.config})"


_BACKENDS: dict[ForaConfig, ForaBackend] = {}


def backend(config: ForaConfig | None = None, **options: Any) -> ForaBackend:
    """The backend for a config: `torch.compile(m, backend=fora_fx.backend(cfg))`.

    One object per distinct config, so that compiling another model with the same config
    reuses Dynamo's cache entry instead of adding one (entries per code object are limited).
    """
    if config is None:
        config = ForaConfig(**options)
    elif options:
        config = config.replace(**options)
    if config not in _BACKENDS:
        _BACKENDS[config] = ForaBackend(config)
    return _BACKENDS[config]


def fora_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> CompiledPair:
    """The backend registered as "fora"; `options=` carries ForaConfig fields."""
    return backend(ForaConfig.from_options(options, mode))(gm, example_inputs)


def register() -> None:
    from torch._dynamo.backends import registry

    # If torch already knows "fora" from our entry point it is loading us right now (or will
    # on first lookup) and registers this same function itself; registering here too would
    # raise "duplicate name: fora".
    if "fora" in registry._COMPILER_FNS or registry._BACKENDS.get("fora") is not None:
        return
    registry.register_backend(fora_backend, name="fora")
