"""Public verbs: transform, reset, restore. (explain lives in explain.py.)"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from . import direct, guards, hooks
from .backend import NoSitesError, backend, describe_refusals
from .capture import module_paths
from .config import ForaConfig
from .dispatch import active, runtimes_of
from .passes import LocateResult
from .pipelines import is_pipeline, restore_pipeline, transform_pipeline, wrapped
from .runtime import Runtime
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
    and so do attribute writes; `state_dict()` is the model's own. The forward runs under
    torch.no_grad(): FORA is an inference method and its caches carry no autograd history.
    """

    def __init__(
        self, model: torch.nn.Module, config: ForaConfig, source: PipelineSteps | None = None
    ):
        super().__init__()
        # `fast.training` is the model's (train() / eval() act on it), not a stale own copy.
        del self.__dict__["training"]
        if model.training:
            warnings.warn(
                f"fora_fx.transform: {type(model).__name__} is in training mode (dropout, label "
                "dropout active); FORA is an inference method. Call model.eval() first.",
                stacklevel=3,
            )
        runtime = Runtime(config, source)
        if config.hook_sites:
            hooks.install(runtime, hooks.resolve(model, config.hook_sites))
        paths = module_paths(model)
        # Stored outside _modules so that state_dict keys keep no wrapper prefix.
        self.__dict__["_fora_model"] = model
        self.__dict__["_fora_config"] = config
        self.__dict__["_fora_runtime"] = runtime
        self.__dict__["_fora_paths"] = paths
        self.__dict__["_fora_compiled"] = torch.compile(
            model, backend=backend(config), fullgraph=config.fullgraph, dynamic=False
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime = self._fora_runtime
        config = self._fora_config
        if not config.fullgraph:
            return self._piecewise(args, kwargs)
        # fora_fx/guards.py: when a call may skip Dynamo's guard evaluation; then
        # fora_fx/direct.py: when it may skip Dynamo's frame as well
        sig = guards.signature(args, kwargs) if config.skip_guards else None
        repeats = (
            sig is not None
            and runtime.continuing()
            and self.__dict__.get("_fora_last") == (sig, self._fora_state())
        )
        call = self.__dict__.get("_fora_direct") if repeats else None
        if call is not None and not call.valid():
            call, repeats = None, False  # a tensor attribute was reassigned: through Dynamo
        stance = guards.unguarded() if repeats and call is None else None
        runs = runtime.stats.calls
        with torch.no_grad(), active(runtime, self._fora_paths):
            if call is not None:
                out = call(args, kwargs)
                runtime.stats.direct += 1
            elif stance is not None:
                with stance:
                    out = self._fora_compiled(*args, **kwargs)
            else:
                with direct.recording() as records:
                    out = self._guarded(args, kwargs)
        if runtime.stats.calls - runs != 1:
            self._split_forward(runtime.stats.calls - runs)
        if call is not None or stance is not None:
            runtime.stats.unguarded += 1
        elif sig is not None:  # what the next call must repeat to skip the guards (after
            # an unguarded call it is what it was: that is why it ran so)
            if "_fora_last_param" not in self.__dict__:  # walking them all costs ~1 ms
                self.__dict__["_fora_last_param"] = guards.last_parameter(self._fora_model)
            skippable = direct.skippable(records)
            self.__dict__["_fora_last"] = (sig, self._fora_state()) if skippable else None
            self.__dict__["_fora_direct"] = (
                direct.plan(records, args, kwargs, out, self._fora_model)
                if config.direct_calls and skippable else None
            )
        return out

    def _split_forward(self, graphs: int) -> None:
        """fullgraph=True, yet this call ran `graphs` FORA graphs, not one: Dynamo skipped the
        model's own frame and compiled the frames it calls. It does so for the rest of the
        process once it met a graph break it could not resume from in that code (a
        fullgraph=False transform, or a torch.compile without fullgraph, of a model with
        the same code: diffusers models share their `apply_lora_scale` wrapper). Each graph
        would count as a step: refuse rather than cache on a wrong schedule."""
        self._fora_runtime.reset()
        raise RuntimeError(
            f"fora_fx: one call of {type(self._fora_model).__name__} ran {graphs} FORA graphs "
            "instead of one whole-forward graph: Dynamo is skipping the model's own frame, "
            "which it does for the rest of a process after a graph break it cannot resume "
            "from in the same code (an earlier fullgraph=False transform, or torch.compile "
            "without fullgraph, of a model sharing this code). Call torch._dynamo.reset() "
            "before transforming this model, or transform it with fullgraph=False too."
        )

    def _piecewise(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A model call Dynamo may split into several graphs (ForaConfig.fullgraph=False):
        always through Dynamo's frames, with one step decision for all of them."""
        runtime = self._fora_runtime
        with torch.no_grad(), active(runtime, self._fora_paths), runtime.piecewise():
            out = self._guarded(args, kwargs)
        pairs = runtime.pairs
        if not any(p.sites for p in pairs) and not runtime.hooked:
            found = LocateResult(sites=[s for p in pairs for s in p.located.sites],
                                 refused=[r for p in pairs for r in p.located.refused])
            raise NoSitesError(
                f"fora_fx found no attention or MLP site to cache in the graphs Dynamo "
                f"captured of {type(self._fora_model).__name__} ({len(pairs)} graph(s)):\n"
                + describe_refusals(found, self._fora_config)
            )
        return out

    def _fora_state(self) -> tuple:
        return guards.model_state(self._fora_model, self.__dict__.get("_fora_last_param"))

    def _guarded(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        try:
            try:
                return self._fora_compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                # Dynamo keeps one cache per code object: every model of this class (and
                # every input shape; diffusers' shared peft `wrapper` for every model class)
                # compiled in this process counts toward recompile_limit (8), though this
                # model only needs an entry per input shape. Raise the limit for this call
                # only, rather than fail or silently fall back to eager.
                limit = max(torch._dynamo.config.recompile_limit, 64)
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return self._fora_compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # The library's own errors reach the caller as themselves, not wrapped in
            # Dynamo's (`except fora_fx.NoSitesError` must catch a model with no site).
            if isinstance(e.inner_exception, NoSitesError):
                raise e.inner_exception from None
            raise
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            # fullgraph=True: Dynamo hit a break, or a size it cannot guard on (HunyuanImage
            # 2.1 reorders each sample's tokens with boolean masks before attention)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(
                f"fora_fx needs the whole forward of {type(self._fora_model).__name__} as one "
                f"graph, and Dynamo cannot capture it in one (a graph break: {first}). The "
                "Dynamo error below names the line; that code must change (e.g. no Python "
                "branch on a tensor's value) before FORA can cache this model as one graph; "
                "or transform it with fullgraph=False to cache the sites of the graphs "
                "Dynamo does capture (slower per step: Python between the graphs). If that "
                "line runs on the first call only (a table built lazily, as Bria FIBO 2's "
                "rotary embedder does), call the untransformed model once before transforming "
                "it."
            ) from e

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """Calls inside use the cache of guidance branch `name` (diffusers' API: Flux true
        CFG runs `with transformer.cache_context("cond"): ...` and then "uncond")."""
        runtime = self._fora_runtime
        previous, runtime.context = runtime.context, str(name)
        try:
            yield
        finally:
            runtime.context = previous

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_fora_model")
            if model is None:
                raise
            return getattr(model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Writes reach the wrapped model, as reads do (`fast.some_flag = True` must change
        # what the model does, not a copy on the wrapper the model never sees). The wrapper's
        # own state lives in __dict__ under _fora_* and nn.Module's bookkeeping, set before
        # the model is attached.
        model = self.__dict__.get("_fora_model")
        if model is None or name.startswith("_"):
            super().__setattr__(name, value)
        else:
            setattr(model, name, value)

    def __delattr__(self, name: str) -> None:
        model = self.__dict__.get("_fora_model")
        if model is None or name.startswith("_"):
            super().__delattr__(name)
        else:
            delattr(model, name)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForaModule:
        """An independent transformed model: a deep copy of the wrapped model, the same
        config, empty caches and step 0 (compiled on its first call). A copy made with its
        pipeline (`copy.deepcopy(pipe)`) follows the copied pipeline's scheduler; a copy of
        the transformer alone counts its own calls."""
        model = copy.deepcopy(self._fora_model, memo)
        config = self._fora_config
        if config.hook_sites:  # the copy carries the original's hook wrappers: new ones
            hooks.remove(hooks.resolve(model, config.hook_sites))
        source = self._fora_runtime.source
        pipe = memo.get(id(source.pipe)) if source is not None else None
        steps = None
        if pipe is not None:  # one PipelineSteps per copied pipeline, for all its transformers
            steps = memo.setdefault(id(source), PipelineSteps(pipe))
        return ForaModule(model, config, steps)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "fora_fx: a transformed model cannot be pickled (torch.save): it holds compiled "
            "graphs and cache buffers. Save the weights instead, "
            "torch.save(fast.state_dict(), path) (the wrapped model's own keys), and call "
            "fora_fx.transform again on the model you load them into."
        )

    def __repr__(self) -> str:
        c = self._fora_config
        model = self._fora_model
        return f"ForaModule(interval={c.interval}, compiler={c.compiler!r},\n  {model!r})"


def _delegate(name: str, chained: bool) -> Any:
    def method(self: ForaModule, *args: Any, **kwargs: Any) -> Any:
        out = getattr(self._fora_model, name)(*args, **kwargs)
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
        return [obj._fora_runtime]
    if is_pipeline(obj):
        fasts = wrapped(obj)
        if fasts:
            return [f._fora_runtime for f in fasts.values()]
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
        return obj._fora_model
    return obj
