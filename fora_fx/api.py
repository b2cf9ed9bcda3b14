"""Public verbs: transform, reset, restore, stats. (explain lives in explain.py.)"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from . import piecewise, tuning
from .backend import backend_for
from .capture import module_paths
from .config import ForaConfig
from .pipelines import is_pipeline, restore_pipeline, transform_pipeline, wrapped
from .runtime import Runtime, Stats, runtimes_of
from .steps import PipelineSteps

# nn.Module methods that must act on the wrapped model, so the wrapper is a drop-in:
# same parameters, same state_dict keys, same train/eval and device moves.
_DELEGATED = (
    "state_dict", "load_state_dict", "parameters", "named_parameters", "buffers",
    "named_buffers", "children", "named_children", "modules", "named_modules",
    "get_submodule", "get_parameter", "get_buffer", "requires_grad_", "zero_grad",
)
_CHAINED = ("to", "cpu", "cuda", "float", "half", "bfloat16", "double", "type", "train", "eval")


class ForaModule(torch.nn.Module):
    """A model whose forward runs FORA-rewritten graphs. Made by `fora_fx.transform`.

    Attribute access (`.config`, `.dtype`, `.device`, submodules) reaches the wrapped model,
    and so do attribute writes; `state_dict()` is the model's own. All FORA state is the
    Runtime's (`_fora`). The forward runs under torch.no_grad(): FORA is an inference method
    and its caches carry no autograd history.
    """

    def __init__(self, model: torch.nn.Module, config: ForaConfig,
                 source: PipelineSteps | None = None, tune: tuning.Tuning | None = None):
        super().__init__()
        # `fast.training` is the model's (train() / eval() act on it), not a stale own copy.
        del self.__dict__["training"]
        if model.training:
            warnings.warn(
                f"fora_fx.transform: {type(model).__name__} is in training mode (dropout, label "
                "dropout active); FORA is an inference method. Call model.eval() first.",
                stacklevel=3,
            )
        tune = tune or tuning.current()
        # the tuning given (a copy keeps its original's), not whatever is current now; one
        # backend for every schedule (config.graphs): this model's Runtime, found per call,
        # holds the schedule
        compiled = torch.compile(model, backend=backend_for(config.graphs, tune), dynamic=False,
                                 fullgraph=config.piecewise is None)
        runtime = Runtime(config, tune, source, model, compiled, module_paths(model))
        if config.piecewise is not None and config.piecewise.hook_sites:
            hooked = piecewise.resolve(model, config.piecewise.hook_sites)
            runtime.on_release.append(piecewise.install(hooked, runtime.run_module))
            runtime.hooked = [path for path, _ in hooked]
        # Outside _modules, so that state_dict keys keep no wrapper prefix.
        self.__dict__["_fora"] = runtime

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fora.call(args, kwargs)

    @property
    def fora_config(self) -> ForaConfig:
        return self._fora.config

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Calls inside use the cache of guidance branch `name` (diffusers' API: Flux true
        CFG runs `with transformer.cache_context("cond"): ...` and then "uncond")."""
        runtime = self._fora
        previous, runtime.context = runtime.context, str(name)
        try:
            yield
        finally:
            runtime.context = previous

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            runtime = self.__dict__.get("_fora")
            if runtime is None:
                raise
            return getattr(runtime.model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Writes reach the wrapped model, as reads do (`fast.some_flag = True` must change
        # what the model does, not a copy on the wrapper the model never sees). The wrapper's
        # own state lives in __dict__ under _fora and nn.Module's bookkeeping, set before
        # the model is attached.
        runtime = self.__dict__.get("_fora")
        if runtime is None or name.startswith("_"):
            super().__setattr__(name, value)
        else:
            setattr(runtime.model, name, value)

    def __delattr__(self, name: str) -> None:
        runtime = self.__dict__.get("_fora")
        if runtime is None or name.startswith("_"):
            super().__delattr__(name)
        else:
            delattr(runtime.model, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForaModule:
        """An independent transformed model: a deep copy of the wrapped model, the same
        config, empty caches and step 0 (compiled on its first call). A copy made with its
        pipeline (`copy.deepcopy(pipe)`) follows the copied pipeline's scheduler; a copy of
        the transformer alone counts its own calls."""
        runtime = self._fora
        model = copy.deepcopy(runtime.model, memo)
        config = runtime.config
        if config.piecewise is not None and config.piecewise.hook_sites:
            # the copy carries the original's hook wrappers: new ones
            piecewise.remove(piecewise.resolve(model, config.piecewise.hook_sites))
        source = runtime.source
        pipe = memo.get(id(source.pipe)) if source is not None else None
        steps = None
        if pipe is not None:  # one PipelineSteps per copied pipeline, for all its transformers
            steps = memo.setdefault(id(source), PipelineSteps(pipe))
        return ForaModule(model, config, steps, runtime.tuning)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "fora_fx: a transformed model cannot be pickled (torch.save): it holds compiled "
            "graphs and cache buffers. Save the weights instead, "
            "torch.save(fast.state_dict(), path) (the wrapped model's own keys), and call "
            "fora_fx.transform again on the model you load them into."
        )

    def __repr__(self) -> str:
        c, model = self._fora.config, self._fora.model
        rule = f"interval={c.interval}" if c.schedule is None else f"schedule={c.schedule!r}"
        return f"ForaModule({rule}, compiler={c.compiler!r},\n  {model!r})"


def _delegate(name: str, chained: bool) -> Any:
    def method(self: ForaModule, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self._fora.model, name)(*args, **kwargs)
        return self if chained else out

    method.__name__ = name
    method.__doc__ = f"Calls the wrapped model's `{name}`."
    return method


for _name in _DELEGATED:
    setattr(ForaModule, _name, _delegate(_name, chained=False))
for _name in _CHAINED:
    setattr(ForaModule, _name, _delegate(_name, chained=True))


def transform(
    model: torch.nn.Module, config: ForaConfig | int | None = None, **options: Any
) -> ForaModule:
    """Returns `model` with FORA caching: `fora_fx.transform(model, interval=3)`.

    `config` is a ForaConfig (or an int, FORA's interval N); keyword options override its
    fields. The model is captured and compiled on its first call.
    """
    if isinstance(model, ForaModule):
        raise TypeError("fora_fx.transform: this model is already transformed")
    if not isinstance(model, torch.nn.Module) and not is_pipeline(model):
        raise TypeError(
            "fora_fx.transform expects a torch.nn.Module or a diffusers pipeline, got "
            f"{type(model).__name__}"
        )
    if isinstance(config, int) and not isinstance(config, bool):
        config = ForaConfig(interval=config)
    if config is None:
        config = ForaConfig(**options)
    elif not isinstance(config, ForaConfig):
        raise TypeError(
            f"fora_fx.transform: config must be a ForaConfig or an int interval, got {config!r}"
        )
    elif options:
        config = config.replace(**options)
    if is_pipeline(model):
        return transform_pipeline(model, config, ForaModule)
    return ForaModule(model, config)


def runtimes(obj: Any) -> list[Runtime]:
    if isinstance(obj, ForaModule):
        return [obj._fora]
    if is_pipeline(obj):
        fasts = wrapped(obj)
        if fasts:
            return [f._fora for f in fasts.values()]
        raise TypeError(f"{type(obj).__name__} was not transformed by fora_fx.transform")
    orig = getattr(obj, "_orig_mod", None)  # torch.compile(...) of a module
    if isinstance(orig, torch.nn.Module):
        return runtimes_of(orig)  # none before its first call
    if isinstance(obj, torch.nn.Module):
        found = runtimes_of(obj)
        if found:
            return found
        raise TypeError(
            f"{type(obj).__name__} has no fora_fx state: it was not transformed by "
            "fora_fx.transform, nor called after torch.compile(..., backend='fora'). Pass the "
            "module fora_fx.transform returned."
        )
    raise TypeError(
        "expected a module returned by fora_fx.transform or compiled with backend='fora', "
        f"got {type(obj).__name__}"
    )


def reset(obj: Any) -> None:
    """Starts a new generation: the next call is step 0 and recomputes every site."""
    for rt in runtimes(obj):
        rt.reset()


def restore(obj: Any) -> Any:
    """Frees the caches. For a ForaModule, returns the original, untouched model; for a
    pipeline, puts its original transformer back and returns the pipeline."""
    if is_pipeline(obj):
        return restore_pipeline(obj)
    for rt in runtimes(obj):
        rt.release()
    if isinstance(obj, ForaModule):
        return obj._fora.model
    return obj


def stats(obj: Any) -> Stats:
    """What happened so far: calls, refreshes, reuses (and the per-call history), calls that
    skipped Dynamo's guards / frame, graphs compiled, the step the next call runs, guidance
    branches, cache bytes. For a pipeline, its `transformer`'s (pass `pipe.transformer_2` for
    the second expert)."""
    if is_pipeline(obj):
        obj = getattr(obj, "transformer", None)
    found = runtimes(obj)
    if len(found) > 1:
        raise ValueError(f"{type(obj).__name__} was compiled with {len(found)} fora configs; "
                         "each keeps its own state: transform it with fora_fx.transform")
    return found[0].snapshot() if found else Stats()
