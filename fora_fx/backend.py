"""The "fora" Dynamo backend: locate -> rewrite -> verify -> compile -> dispatcher.

This is the ~10 lines that run the passes (`build_pair`). `torch.compile(m, backend="fora")`
finds `fora_backend` through the `torch_dynamo_backends` entry point; importing fora_fx also
registers it, guarded so that both paths work in either order (DESIGN.md section 4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils.weak import WeakIdKeyDictionary

from .compile import compile_variant
from .config import ForaConfig
from .passes import LocateResult, buffer_names, clone, elide_loads, locate, specialize, verify
from .runtime import CompiledPair, Runtime


class NoSitesError(ValueError):
    """Raised when a model has nothing FORA can cache."""


def describe_refusals(located: LocateResult, config: ForaConfig) -> str:
    lines = [f"  {r.module_path} ({r.kind}): {r.reason}" for r in located.refused]
    skipped = [s for s in located.sites if s.kind not in config.sites]
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
    runtime: Runtime,
    module_paths: Mapping[str, str] | None = None,
) -> CompiledPair:
    located = locate(gm, module_paths)
    sites = [s for s in located.sites if s.kind in config.sites]
    if not sites:
        raise NoSitesError(
            "fora_fx found no attention or MLP site to cache in this model:\n"
            + describe_refusals(located, config)
        )
    refresh = specialize(gm, sites, refresh=True)
    reuse = specialize(gm, sites, refresh=False)
    verify(gm, refresh, sites, refresh=True)
    verify(gm, reuse, sites, refresh=False)
    graphs = {"refresh": clone(refresh), "reuse": clone(reuse)}
    elide_loads(reuse)

    buffers = _allocate_buffers(gm, sites)
    for variant in (refresh, reuse):
        _mark_cache_inputs(variant)
    inputs = [*example_inputs, *buffers]
    pair = CompiledPair(
        runtime,
        refresh=compile_variant(refresh, inputs, config),
        reuse=compile_variant(reuse, inputs, config),
        buffers=buffers,
        located=located,
        sites=sites,
        graphs=graphs,
    )
    runtime.register(pair)
    return pair


def _allocate_buffers(gm: GraphModule, sites: Sequence[Any]) -> list[torch.Tensor]:
    # Persistent, static-address buffers, written in place by fora::store. Outputs of a
    # CUDA-graph replay are overwritten by the next replay, so they cannot serve as the cache.
    nodes = {n.name: n for n in gm.graph.nodes}
    buffers = []
    for site in sites:
        for out in site.outputs:
            val = nodes[out].meta["example_value"]
            buffers.append(torch.zeros(val.shape, dtype=val.dtype, device=val.device))
    return buffers


def _mark_cache_inputs(gm: GraphModule) -> None:
    """Gives cache placeholders a Dynamo source so AOTAutograd treats them as static inputs."""
    from torch._dynamo.source import ConstantSource

    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if not any(hasattr(n, "_dynamo_source") for n in placeholders):
        return  # not a Dynamo graph (tests may build one by hand): nothing to match
    for n in placeholders:
        if "fora_cache" in n.meta:
            n._dynamo_source = ConstantSource(n.name)  # type: ignore[attr-defined]


class ForaBackend:
    """A configured backend: `torch.compile(model, backend=ForaBackend(config))`."""

    def __init__(
        self,
        config: ForaConfig,
        runtime: Runtime | None = None,
        module_paths: Mapping[str, str] | None = None,
    ):
        self.config = config
        self.runtime = runtime
        self.module_paths = module_paths

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> CompiledPair:
        _check_single_graph(gm)
        runtime = self.runtime or runtime_for(example_inputs, self.config)
        return build_pair(gm, example_inputs, self.config, runtime, self.module_paths)


# Runtimes of models compiled by name, keyed by one of their parameters, so that
# fora_fx.reset(model) finds them and graphs of the same model (new shapes) share a counter.
_RUNTIMES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def runtime_for(example_inputs: Sequence[Any], config: ForaConfig) -> Runtime:
    params = [t for t in example_inputs if isinstance(t, torch.nn.Parameter)]
    if not params:
        return Runtime(config)  # nothing to key on: one runtime per graph
    for p in params:
        by_config = _RUNTIMES.get(p)
        if by_config is not None and config in by_config:
            return by_config[config]
    runtime = Runtime(config)
    _RUNTIMES.setdefault(params[0], {})[config] = runtime
    return runtime


def runtimes_of(module: torch.nn.Module) -> list[Runtime]:
    found: list[Runtime] = []
    for p in module.parameters():
        for rt in (_RUNTIMES.get(p) or {}).values():
            if rt not in found:
                found.append(rt)
    return found


def backend(config: ForaConfig | None = None, **options: Any) -> ForaBackend:
    """A backend for a config object: `torch.compile(m, backend=fora_fx.backend(cfg))`."""
    if config is None:
        config = ForaConfig(**options)
    elif options:
        config = config.replace(**options)
    return ForaBackend(config)


def fora_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> CompiledPair:
    """The backend registered as "fora"; `options=` carries ForaConfig fields."""
    return ForaBackend(ForaConfig.from_options(options, mode))(gm, example_inputs)


def register() -> None:
    from torch._dynamo.backends import registry

    # If torch already knows "fora" from our entry point it is loading us right now (or will
    # on first lookup) and registers this same function itself; registering here too would
    # raise "duplicate name: fora".
    if "fora" in registry._COMPILER_FNS or registry._BACKENDS.get("fora") is not None:
        return
    registry.register_backend(fora_backend, name="fora")
