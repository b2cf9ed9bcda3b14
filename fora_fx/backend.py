"""The "fora" Dynamo backend: locate -> rewrite pipeline -> compile -> a CompiledPair.

`torch.compile(m, backend="fora")` finds `fora_backend` through the `torch_dynamo_backends`
entry point; importing fora_fx also registers it, guarded so that both paths work in either
order (registering a name the entry point already declares raises "duplicate name: fora").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from . import tuning
from .compile import (
    BufferSpec,
    CompiledPair,
    compile_variant,
    fusion_limit_patches,
    store_placement_patches,
)
from .config import ForaConfig
from .fastpath import frame_effects
from .passes import CLOCK, Refusal, Site, locate, rewrite, stack_names
from .runtime import NoSitesError, Runtime, describe_refusals, route


def build_pair(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    config: ForaConfig,
    module_paths: Mapping[str, str] | None = None,
    earlier_sites: Sequence[Site] = (),
    tune: tuning.Tuning | None = None,
) -> CompiledPair:
    tune = tune or tuning.current()
    located = locate(gm, module_paths, config.sites, earlier_sites)
    sites = []
    for s in located.sites:
        pattern = config.excluded_by(s.module_path)
        if pattern is not None:
            located.refused.append(Refusal(s.module_path, s.kind, f"excluded by {pattern!r}"))
        elif s.kind in config.sites:
            sites.append(s)
    if not sites:
        if config.piecewise is not None:  # one piece of a piecewise model: it runs as it is
            plain = compile_variant(gm, example_inputs, config)
            return CompiledPair(plain, plain, [], located, [])
        raise NoSitesError("fora_fx found no attention or MLP site to cache in this model:\n"
                           + describe_refusals(located, config))
    lower = config.compiler != "eager"  # eager runs the ops as written, for debugging
    variants = {name: rewrite(gm, sites, name == "refresh", module_paths, tune.batch_blocks,
                              lower, config.taylor_order) for name in ("refresh", "reuse")}
    # One buffer per cache placeholder (site outputs, forecast factors, the forecast clock),
    # in placeholder order; both variants take the same list.
    cached = [n for n in variants["refresh"].graph.graph.find_nodes(op="placeholder")
              if "fora_cache" in n.meta]
    specs = [BufferSpec(tuple(int(d) for d in v.shape), v.dtype, v.device)
             for v in (n.meta["example_value"] for n in cached)]
    index = {n.name: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
    groups = {name: [tuple(index[m] for m in members) for _, members in stack_names(v.graph)]
              for name, v in variants.items()}
    buffers = [s.allocate() for s in specs]
    first = len(example_inputs)  # the cache buffers follow the graph's own inputs
    patches = {"refresh": store_placement_patches(range(first, first + len(buffers))),
               "reuse": fusion_limit_patches(tune.reuse_fusion_limit)}
    compiled = {}
    for name, v in variants.items():
        _mark_cache_inputs(v.graph)
        stacked = [_example_stack([example_inputs[i] for i in g]) for g in groups[name]]
        compiled[name] = compile_variant(v.graph, [*example_inputs, *buffers, *stacked], config,
                                         patches[name])
    params = [i for i, t in enumerate(example_inputs) if isinstance(t, torch.nn.Parameter)]
    return CompiledPair(
        compiled["refresh"], compiled["reuse"], specs, located, sites,
        graphs={name: v.readable for name, v in variants.items()},
        counts={name: v.counts for name, v in variants.items()},
        batched={name: v.batched for name, v in variants.items() if tune.batch_blocks},
        stack_groups=groups, param_index=params[0] if params else None,
        clock=next((i for i, n in enumerate(cached) if n.name == CLOCK), None))


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

    def __init__(self, config: ForaConfig, tune: tuning.Tuning):
        self.config = config
        self.tuning = tune

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Any:
        """Compiles one captured graph; returns what Dynamo calls (`CompiledPair.entry`)."""
        runtime = Runtime.current()
        if self.config.piecewise is None:
            reason = getattr(gm, "compile_subgraph_reason", None)
            if reason is not None and getattr(reason, "graph_break", False):
                raise RuntimeError(
                    "fora needs the whole forward as one graph, but Dynamo broke it "
                    f"({reason.reason}). Compile with fullgraph=True to see where, and remove "
                    "the break.")
        elif runtime is None:
            raise ValueError(
                "ForaConfig(piecewise=...) works through fora_fx.transform only, which decides "
                "each model call's step once for all of its graphs; "
                "torch.compile(backend='fora') sees graphs, not model calls")
        # A piecewise model's graphs run in order: what its earlier graphs cache.
        earlier = [s for p in runtime.pairs for s in p.sites] if runtime is not None else []
        paths = runtime.paths if runtime is not None else None
        pair = build_pair(gm, example_inputs, self.config, paths, earlier, self.tuning)
        pair.frame_effects = frame_effects()
        pair.entry = functools.partial(route, pair, self.config, self.tuning)
        return pair.entry

    def __repr__(self) -> str:
        return f"ForaBackend({self.config}, {self.tuning})"


_BACKENDS: dict[tuple[ForaConfig, tuple], ForaBackend] = {}


def backend(config: ForaConfig | None = None, **options: Any) -> ForaBackend:
    """The backend for a config: `torch.compile(m, backend=fora_fx.backend(cfg))`.

    One object per distinct config and graph-changing tuning, so that compiling another model
    with the same config reuses Dynamo's cache entry instead of adding one (entries per code
    object are limited).
    """
    if config is None:
        config = ForaConfig(**options)
    elif options:
        config = config.replace(**options)
    return backend_for(config, tuning.current())


def backend_for(config: ForaConfig, tune: tuning.Tuning) -> ForaBackend:
    """The one backend for this config and these graph-changing settings."""
    key = (config, tune.graph_key)
    if key not in _BACKENDS:
        _BACKENDS[key] = ForaBackend(config, tune)
    return _BACKENDS[key]


def fora_backend(
    gm: GraphModule,
    example_inputs: Sequence[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
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
