"""Run stage: one `Runtime` per transformed model owns all of its mutable FORA state and its
call path: the step position, the cache buffers and which graph's buffers hold the current
generation, the parameter stacks, the fast path, the counters.

A call of a transformed model enters `Runtime.call`; each captured graph Dynamo runs enters
`route` (the compiled pair's entry point), which finds that Runtime and picks the refresh or
reuse variant from a Python int: no device->host sync, no recompile, no graph break.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from . import parallel, stacks
from .capture import recompile_headroom
from .compile import CompiledPair
from .config import ForaConfig
from .fastpath import DirectCall, FastPath, Record
from .passes import LocateResult
from .piecewise import Piece, PieceCaches
from .steps import PipelineSteps
from .tuning import Tuning


class NoSitesError(ValueError):
    """Raised when a model has nothing FORA can cache."""


def describe_refusals(located: LocateResult, config: ForaConfig) -> str:
    lines = [f"  {r.module_path} ({r.kind}): {r.reason}" for r in located.refused]
    lines += [f"  {s.module_path} ({s.kind}): not in config.sites={config.sites}"
              for s in located.sites
              if s.kind not in config.sites and config.excluded_by(s.module_path) is None]
    return "\n".join(lines) if lines else "  (no attention or MLP region found)"


@dataclass
class Stats:
    """What happened so far (`fora_fx.stats`)."""

    calls: int = 0
    refreshes: int = 0
    reuses: int = 0
    history: list[bool] = field(default_factory=list)  # per call: True = refreshed (last 4096)
    unguarded: int = 0  # calls run with Dynamo's guard evaluation skipped
    direct: int = 0  # of those, calls that also skipped Dynamo's frame
    step: int = 0  # the step the next call of the default branch runs
    graphs: int = 0  # captured graphs compiled (a refresh / reuse pair each)
    branches: tuple[str, ...] = ()  # guidance branches with a cache
    cache_bytes: int = 0


@dataclass
class Branch:
    """Cache state of one guidance branch (e.g. "cond" / "uncond" calls within a step)."""

    name: str
    owner: CompiledPair | None = None  # whose buffers hold this generation's cache
    buffers: dict[CompiledPair, list[torch.Tensor]] = field(default_factory=dict)
    calls: int = 0  # calls in this generation: the step index when nothing else says
    pieces: PieceCaches = field(default_factory=PieceCaches)  # piecewise calls' caches

    def invalidate(self) -> None:
        self.owner = None
        self.pieces.filled.clear()


DEFAULT_BRANCH = "default"
_current = threading.local()  # the Runtime whose model call is under way on this thread
# Runtimes of models compiled by name (torch.compile(m, backend="fora")), keyed by one of the
# model's parameters, so that fora_fx.reset(model) finds them and each model keeps its own.
_BY_PARAM: WeakIdKeyDictionary = WeakIdKeyDictionary()


def route(pair: CompiledPair, config: ForaConfig, tune: Tuning, *args: Any) -> Any:
    """A compiled pair's entry point: runs it for the model being called."""
    runtime = Runtime.current()
    if runtime is None:  # compiled by name: the model whose parameter was passed in
        key = args[pair.param_index] if pair.param_index is not None else pair
        by_config = _BY_PARAM.get(key)
        if by_config is None:  # not setdefault: that would build a dict on every step
            by_config = _BY_PARAM[key] = {}
        runtime = by_config.get(config)
        if runtime is None:
            runtime = by_config[config] = Runtime(config, tune)
    return runtime.run(pair, args)


def runtimes_of(module: torch.nn.Module) -> list[Runtime]:
    """The runtimes of a module compiled by name (none before its first call)."""
    found: dict[Runtime, None] = {}
    for p in module.parameters():
        found.update(dict.fromkeys((_BY_PARAM.get(p) or {}).values()))
    return list(found)


class Runtime:
    """Step position, schedule, cache buffers and cache validity for one transformed model.

    Branches: calls named by `cache_context(name)` use that name's cache; with a step index
    from a scheduler, the k-th call within one denoising step is branch "call<k>" (a pipeline
    that calls the transformer twice per step gets two caches, never a mixed one); otherwise
    every call is the one "default" branch.
    """

    def __init__(self, config: ForaConfig, tune: Tuning, source: PipelineSteps | None = None,
                 model: torch.nn.Module | None = None, compiled: Callable[..., Any] | None = None,
                 paths: Mapping[str, str] | None = None):
        self.config, self.tuning, self.source = config, tune, source
        self.model, self.compiled, self.paths = model, compiled, paths
        self.fast = FastPath(tune.fast_calls, model) if model is not None else None
        self.branches: dict[str, Branch] = {}
        self.context: str | None = None  # set by ForaModule.cache_context
        self.released = False
        self.stats = Stats()
        self.pairs: list[CompiledPair] = []  # in the order they first ran
        self.hooked: list[str] = []  # module paths of hook sites (fora_fx/piecewise.py)
        self.on_release: list[Callable[[], None]] = []  # e.g. removing hook wrappers
        self._records: list[Record] | None = None  # pairs run by a guarded call, for `fast`
        self._token: object = None  # the source's generation marker
        self._step_key: int | None = None  # step index of the previous call
        self._calls_this_step = 0
        self._stacks: dict[tuple[Any, tuple[int, ...]], torch.Tensor] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread whose generation is under way
        self._piece: Piece | None = None  # set during a piecewise call

    @staticmethod
    def current() -> Runtime | None:
        return getattr(_current, "runtime", None)

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        previous, _current.runtime = Runtime.current(), self
        try:
            with torch.no_grad():
                yield
        finally:
            _current.runtime = previous

    # -- a model call ---------------------------------------------------------------------

    def call(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """One call of the transformed model (ForaModule.forward)."""
        if self.config.piecewise is not None:
            return self._call_piecewise(args, kwargs)
        assert self.fast is not None
        sig = self.fast.signature(args, kwargs)
        skip = self.fast.skip(sig) if self.continuing() else None
        calls = self.stats.calls
        with self._calling():
            if isinstance(skip, DirectCall):
                out = skip(args, kwargs)
                self.stats.direct += 1
            elif skip is not None:
                with skip:  # Dynamo's frame, its guards skipped
                    out = self.compiled(*args, **kwargs)  # type: ignore[misc]
            else:
                self._records = []
                try:
                    out = self._through_dynamo(args, kwargs)
                finally:
                    records, self._records = self._records, None
        if self.stats.calls - calls != 1:
            self._split_forward(self.stats.calls - calls)
        if skip is not None:
            self.stats.unguarded += 1
        elif sig is not None:
            self.fast.learn(sig, records, args, kwargs, out)
        return out

    def _call_piecewise(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """A call Dynamo may split into several graphs, with hook sites between them: always
        through Dynamo's frames, the step decided once for all of them (fora_fx/piecewise.py)."""
        with self._calling(), self._piecewise():
            out = self._through_dynamo(args, kwargs)
        if not self.pairs and not self.hooked:  # (hook sites may be all a model has)
            self.reset()
            raise RuntimeError(
                f"fora_fx: Dynamo ran {type(self.model).__name__}'s forward without compiling "
                "any of it, so nothing was cached: it skips a frame for the rest of a process "
                "after a graph break it cannot resume from there (another torch.compile of "
                "this model class), or after too many compiled versions of that code "
                "(torch._dynamo.config.recompile_limit). Call torch._dynamo.reset() before "
                "transforming this model.")
        if not any(p.sites for p in self.pairs) and not self.hooked:
            found = LocateResult(sites=[s for p in self.pairs for s in p.located.sites],
                                 refused=[r for p in self.pairs for r in p.located.refused])
            raise NoSitesError(
                f"fora_fx found no attention or MLP site to cache in the graphs Dynamo "
                f"captured of {type(self.model).__name__} ({len(self.pairs)} graph(s)):\n"
                + describe_refusals(found, self.config))
        return out

    def _split_forward(self, graphs: int) -> None:
        """A whole-graph call ran `graphs` FORA graphs, not one: Dynamo skipped the model's
        own frame and compiled the frames it calls, which it does for the rest of a process
        after a graph break it could not resume from in that code (diffusers models share
        their `apply_lora_scale` wrapper). Each graph would count as a step: refuse."""
        self.reset()
        raise RuntimeError(
            f"fora_fx: one call of {type(self.model).__name__} ran {graphs} FORA graphs "
            "instead of one whole-forward graph: Dynamo is skipping the model's own frame, "
            "which it does for the rest of a process after a graph break it cannot resume "
            "from in the same code (an earlier piecewise transform, or torch.compile without "
            "fullgraph, of a model sharing this code). Call torch._dynamo.reset() before "
            "transforming this model, or transform it with piecewise=fora_fx.Piecewise() too.")

    def _through_dynamo(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        assert self.compiled is not None
        parallel.prepare(self.model)  # diffusers' context-parallel hooks, traceable
        try:
            if self.config.piecewise is not None:
                # without fullgraph Dynamo does not raise at the limit: it would run the
                # frame uncompiled (and nothing would be cached)
                with recompile_headroom():
                    return self.compiled(*args, **kwargs)
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                with recompile_headroom():  # for this call only (see recompile_headroom)
                    return self.compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            # The library's own errors reach the caller as themselves, not wrapped in
            # Dynamo's (`except fora_fx.NoSitesError` must catch a model with no site).
            if isinstance(e.inner_exception, NoSitesError):
                raise e.inner_exception from None
            raise
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
            # one graph needed: Dynamo hit a break, or a size it cannot guard on (HunyuanImage
            # 2.1 reorders each sample's tokens with boolean masks before attention)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(
                f"fora_fx needs the whole forward of {type(self.model).__name__} as one "
                f"graph, and Dynamo cannot capture it in one (a graph break: {first}). The "
                "Dynamo error below names the line; that code must change (e.g. no Python "
                "branch on a tensor's value) before FORA can cache this model as one graph; "
                "or transform it with piecewise=fora_fx.Piecewise() to cache the sites of "
                "the graphs Dynamo does capture (slower per step: Python between the "
                "graphs). If that line runs on the first call only (a table built lazily, as "
                "Bria FIBO 2's rotary embedder does), call the untransformed model once before "
                "transforming it."
            ) from e

    # -- a graph run -----------------------------------------------------------------------

    def run(self, pair: CompiledPair, args: Sequence[Any]) -> Any:
        """One run of a compiled pair (from `route`)."""
        if pair not in self.pairs:
            self.pairs.append(pair)
        if self._piece is not None:
            return self._piece.run(pair, args, self._stack_inputs)
        self._enter()
        branch: Branch | None = None
        try:
            branch, step, num_steps = self._position()
            buffers = branch.buffers.get(pair)
            if buffers is None:
                buffers = branch.buffers[pair] = [s.allocate() for s in pair.specs]
            # A graph other than the owner (new shape / dtype / device) has no valid cache.
            refresh = self.config.refreshes(step, num_steps) or branch.owner is not pair
            if self.model is not None:  # CP ranks must agree (no-op without CP)
                parallel.check(self.model, self.config, branch.name, step, num_steps, refresh,
                               self.stats.calls)
            if refresh:
                if branch.owner is not pair:
                    pair.start_cold(buffers)
                branch.owner = None  # a refresh that raises half-way leaves no valid cache
                out = pair.refresh(*args, *buffers, *self._stack_inputs(pair, "refresh", args))
                branch.owner = pair
            else:
                out = pair.reuse(*args, *buffers, *self._stack_inputs(pair, "reuse", args))
        except BaseException:
            self._abandon(branch)
            raise
        else:
            self._advance(branch, refresh, num_steps, step)
        finally:
            self._lock.release()
        if self._records is not None:
            self._records.append((pair, tuple(args), out))
        return out

    @contextlib.contextmanager
    def _piecewise(self) -> Iterator[None]:
        """One piecewise model call: the step is decided once, for every graph of the call
        and every hook site, and advances once."""
        self._enter()
        branch: Branch | None = None
        try:
            branch, step, num_steps = self._position()
            refresh = self.config.refreshes(step, num_steps)
            self._piece = Piece(branch.pieces, refresh)
            yield
        except BaseException:
            self._abandon(branch)
            raise
        else:
            self._advance(branch, refresh or self._piece.refreshed, num_steps, step)
        finally:
            self._piece = None
            self._lock.release()

    def run_module(self, path: str, inputs: Any, call: Callable[[], Any]) -> Any:
        """A hook site's call; outside a transformed model's call it simply runs."""
        return call() if self._piece is None else self._piece.run_module(path, inputs, call)

    def _stack_inputs(self, pair: CompiledPair, variant: str, args: Sequence[Any],
                      key: Any = None) -> list:
        """The stacked parameters a variant reads (fora_fx/stacks.py). Every refresh call,
        which every generation starts with, re-checks all of the pair's stacks (re-stacking
        after new storage: model.to, p.data = ...); reuse calls trust the last refresh."""
        groups = pair.stack_groups[variant]
        if not groups:
            return []
        key = pair if key is None else key
        if variant == "refresh" or (key, groups[0]) not in self._stacks:
            for g in dict.fromkeys(g for gs in pair.stack_groups.values() for g in gs):
                self._stacks[(key, g)] = stacks.stack([args[i] for i in g])
        return [self._stacks[(key, g)] for g in groups]

    # -- the schedule ----------------------------------------------------------------------

    def _enter(self) -> None:
        if self.released:
            raise RuntimeError("fora_fx: this model's cache was released by fora_fx.restore")
        # One step at a time: two threads interleaving steps would corrupt both schedules.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "fora_fx: a transformed model was called while another call was running "
                "(another thread?). FORA state is per generation; use one transformed model "
                "per thread (copy.deepcopy(fast) makes an independent one).")
        # A generation belongs to the thread that started it: two threads taking turns would
        # have their steps counted as one generation (wrong outputs, no error). Refused rather
        # than kept per thread: a pipeline's scheduler, which gives the steps, is shared too.
        me = threading.get_ident()
        if self._owner is not None and self._owner != me:
            self._lock.release()
            raise RuntimeError(
                "fora_fx: this transformed model is in the middle of a generation that another "
                "thread started; calls from two threads would be counted as steps of one "
                "generation. Use one transformed model per thread (copy.deepcopy(fast) makes "
                "an independent one with empty caches), or call fora_fx.reset(fast) to end "
                "the other thread's generation and start a new one here.")
        self._owner = me

    def _position(self) -> tuple[Branch, int, int | None]:
        num_steps = self.config.num_steps
        step: int | None = None
        token: object = None
        if self.source is not None:
            token, step, n = self.source.position()
            if token is not self._token:  # a new pipeline call: a new generation (for
                self._restart()  # this transformer; the pipeline's counts restart
                self._token = token  # themselves, on the token)
            if n is not None:
                num_steps = n
        if self.context is not None:
            name = self.context
        elif step is not None:
            if step != self._step_key:
                self._step_key, self._calls_this_step = step, 0
            name = f"call{self._calls_this_step}"
            self._calls_this_step += 1
        else:
            name = DEFAULT_BRANCH
        branch = self.branches.get(name)
        if branch is None:  # not setdefault: that would build a Branch on every step
            branch = self.branches[name] = Branch(name)
        if step is None:  # counted: a pipeline's count spans all of its transformers
            step = branch.calls if self.source is None else self.source.counted(token, name)
        return branch, step, num_steps

    def _abandon(self, branch: Branch | None) -> None:
        """A call raised: no cache of its branch is trusted, and any thread may go on."""
        if branch is not None:
            branch.invalidate()
        self._owner = None

    def _advance(self, branch: Branch, refreshed: bool, num_steps: int | None,
                 step: int) -> None:
        if num_steps is not None and step >= num_steps - 1:
            self._owner = None  # the generation's last step: the next may be any thread's
        s = self.stats
        s.calls += 1
        s.refreshes += refreshed
        s.reuses += not refreshed
        s.history.append(refreshed)
        del s.history[:-4096]
        branch.calls += 1
        if self.source is not None:
            self.source.advance(branch.name)
        elif num_steps is not None and branch.calls >= num_steps:
            branch.calls = 0  # counted steps wrap: a new generation
            branch.invalidate()

    def continuing(self) -> bool:
        """True iff the next call continues a generation under way (is not its first call).
        Pure reads: the pipeline's scheduler, or the branch's counted calls."""
        if self.released:
            return False
        if self.source is not None:
            token, step, _ = self.source.position()
            if token is not self._token:
                return False
            if step is not None:
                return step > 0
        branch = self.branches.get(self.context if self.context is not None else DEFAULT_BRANCH)
        return branch is not None and branch.calls > 0 and branch.owner is not None

    # -- public verbs ----------------------------------------------------------------------

    def snapshot(self) -> Stats:
        default = self.branches.get(DEFAULT_BRANCH)
        tensors = [t for b in self.branches.values()
                   for t in tree_leaves([list(b.buffers.values()), b.pieces.tensors()])
                   if isinstance(t, torch.Tensor)]
        s = self.stats
        return Stats(s.calls, s.refreshes, s.reuses, list(s.history), s.unguarded, s.direct,
                     step=default.calls if default else 0, graphs=len(self.pairs),
                     branches=tuple(self.branches),
                     cache_bytes=sum(t.numel() * t.element_size() for t in tensors))

    def reset(self) -> None:
        """The next call is step 0 of a new generation; no cached value is read again."""
        self._restart()
        self._owner = None
        if self.source is not None:
            self.source.restart()

    def _restart(self) -> None:
        for branch in self.branches.values():
            branch.calls = 0
            branch.invalidate()
        self._step_key, self._calls_this_step = None, 0

    def release(self) -> None:
        """Frees every cache buffer (fora_fx.restore); later calls raise."""
        self.reset()
        self.branches = {}
        self.pairs = []
        stacks.unstack(self._stacks.values())
        self._stacks = {}
        self.released = True
        for undo in self.on_release:
            undo()
        self.on_release = []
