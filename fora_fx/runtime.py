"""Run stage: the one object holding all mutable FORA state of a transformed model.

A `Runtime` (one per transformed model) holds the step counter, the cache buffers, and which
graph's buffers hold the current generation. A compiled graph (fora_fx/dispatch.py) hands it
each call, and it picks the refresh or reuse variant from a Python int: no device->host
sync, no recompile, no graph break.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from . import stacks
from .config import ForaConfig
from .piecewise import HookKey, Piece, PieceKey
from .steps import PipelineSteps

if TYPE_CHECKING:
    from .dispatch import CompiledPair


@dataclass
class Stats:
    calls: int = 0
    refreshes: int = 0
    reuses: int = 0
    history: list[bool] = field(default_factory=list)  # per call: True = refreshed (last 4096)
    unguarded: int = 0  # calls run with Dynamo's guard evaluation skipped (ForaModule)
    direct: int = 0  # of those, calls that also skipped Dynamo's frame (fora_fx/direct.py)


@dataclass
class Branch:
    """Cache state of one guidance branch (e.g. "cond" / "uncond" calls within a step)."""

    owner: CompiledPair | None = None  # whose buffers hold this generation's cache
    buffers: dict[CompiledPair, list[torch.Tensor]] = field(default_factory=dict)
    name: str = "default"
    calls: int = 0  # calls in this generation: the step index when nothing else says
    # Piecewise calls (ForaConfig.fullgraph=False, several graphs per model call): the
    # scheduled refreshes so far, and for each graph the one its cache was last filled in.
    # A graph may run several times in one call (Dynamo compiles a block's forward once and
    # runs it for every block), so a piece's cache is keyed by (graph, the parameters it was
    # called with, occurrence): `PieceKey`.
    period: int = 0
    pieces: dict[PieceKey, list[torch.Tensor]] = field(default_factory=dict)
    filled: dict[PieceKey | HookKey, int] = field(default_factory=dict)
    # hook sites (ForaConfig.hook_sites): the output of each call, and its tensors' versions
    outputs: dict[HookKey, tuple[Any, tuple[int, ...], Any]] = field(default_factory=dict)

    def invalidate(self) -> None:
        self.owner = None
        self.filled.clear()


DEFAULT_BRANCH = "default"


class Runtime:
    """Step position, schedule, cache buffers and cache validity for one transformed model.

    Branches: calls named by `cache_context(name)` use that name's cache; with a step index
    from a scheduler, the k-th call within one denoising step is branch "call<k>" (a pipeline
    that calls the transformer twice per step gets two caches, never a mixed one); otherwise
    every call is the one "default" branch.
    """

    def __init__(self, config: ForaConfig, source: PipelineSteps | None = None):
        self.config = config
        self.source = source
        self.branches: dict[str, Branch] = {}
        self.context: str | None = None  # set by ForaModule.cache_context
        self.released = False
        self.stats = Stats()
        self._token: object = None  # the source's generation marker
        self._step_key: int | None = None  # step index of the previous call
        self._stacks: dict[tuple[Any, tuple[int, ...]], torch.Tensor] = {}  # (pair or piece)
        self._calls_this_step = 0
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread whose generation is under way
        self._piece: Piece | None = None  # set during a piecewise call
        self.on_release: list[Callable[[], None]] = []  # e.g. removing hook sites' wrappers
        self.hooked: list[str] = []  # module paths of hook sites (fora_fx/hooks.py)

    @property
    def step(self) -> int:
        """The step the next call of the default branch would run (counted steps)."""
        branch = self.branches.get(DEFAULT_BRANCH)
        return branch.calls if branch else 0

    @property
    def pairs(self) -> list[CompiledPair]:
        seen: dict[CompiledPair, None] = {}
        for branch in self.branches.values():
            seen.update(dict.fromkeys(branch.buffers))
            seen.update(dict.fromkeys(k[0] for k in branch.pieces))
        return list(seen)

    @property
    def cache_bytes(self) -> int:
        return sum(
            b.numel() * b.element_size()
            for branch in self.branches.values()
            for bufs in [*branch.buffers.values(), *branch.pieces.values(),
                         *(tree_leaves(out) for out, *_ in branch.outputs.values())]
            for b in bufs
            if isinstance(b, torch.Tensor)
        )

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
            branch = self.branches[name] = Branch(name=name)
        if step is None:  # counted: a pipeline's count spans all of its transformers
            step = branch.calls if self.source is None else self.source.counted(token, name)
        return branch, step, num_steps

    def _enter(self) -> None:
        if self.released:
            raise RuntimeError("fora_fx: this model's cache was released by fora_fx.restore")
        # One step at a time: two threads interleaving steps would corrupt both schedules.
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                "fora_fx: a transformed model was called while another call was running "
                "(another thread?). FORA state is per generation; use one transformed model "
                "per thread (copy.deepcopy(fast) makes an independent one)."
            )
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
                "the other thread's generation and start a new one here."
            )
        self._owner = me

    @contextlib.contextmanager
    def piecewise(self) -> Iterator[None]:
        """One model call whose forward Dynamo captured as several graphs (graph breaks;
        ForaConfig.fullgraph=False): the step is decided once, for every graph of the call
        and every hook site, and advances once. On a scheduled refresh everything
        recomputes; otherwise each graph run and hook site reuses its cache if it was filled
        since the last scheduled refresh (one met for the first time, or after new shapes,
        recomputes): fora_fx/piecewise.py."""
        self._enter()
        branch: Branch | None = None
        try:
            branch, step, num_steps = self._position()
            refresh = self.config.refreshes(step, num_steps)
            branch.period += refresh
            self._piece = Piece(branch)
            yield
        except BaseException:
            if branch is not None:
                branch.invalidate()
            self._owner = None
            raise
        else:
            self._advance(branch, refresh or self._piece.refreshed, num_steps, step)
        finally:
            self._piece = None
            self._lock.release()

    def run_module(self, path: str, inputs: Any, call: Callable[[], Any]) -> Any:
        """A hook site's call (fora_fx/hooks.py); outside a transformed model's call it
        simply runs."""
        return call() if self._piece is None else self._piece.run_module(path, inputs, call)

    def run(self, pair: CompiledPair, args: Sequence[Any]) -> Any:
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
            if refresh:
                branch.owner = None  # a refresh that raises half-way leaves no valid cache
                out = pair.refresh(*args, *buffers, *self._stack_inputs(pair, "refresh", args))
                branch.owner = pair
            else:
                out = pair.reuse(*args, *buffers, *self._stack_inputs(pair, "reuse", args))
        except BaseException:
            if branch is not None:
                branch.invalidate()
            self._owner = None
            raise
        else:
            self._advance(branch, refresh, num_steps, step)
        finally:
            self._lock.release()
        return out

    def _stack_inputs(
        self, pair: CompiledPair, variant: str, args: Sequence[Any], key: Any = None
    ) -> list:
        """The stacked parameters a variant reads (fora_fx/stacks.py).

        Every refresh call, which every generation starts with, asks `stacks.stack` for all of
        the pair's stacks: it returns a stack while its parameters still live in it, and
        re-stacks after new storage (model.to, p.data = ...), never serving a stale weight.
        Reuse calls, the cheap steps, trust the last refresh.
        """
        groups = pair.stack_groups[variant]
        if not groups:
            return []
        key = pair if key is None else key
        if variant == "refresh" or (key, groups[0]) not in self._stacks:
            for g in dict.fromkeys(g for gs in pair.stack_groups.values() for g in gs):
                self._stacks[(key, g)] = stacks.stack([args[i] for i in g])
        return [self._stacks[(key, g)] for g in groups]

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
        stacks.unstack(self._stacks.values())
        self._stacks = {}
        self.released = True
        for undo in self.on_release:
            undo()
        self.on_release = []

