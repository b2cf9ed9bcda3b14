"""Piecewise model calls (ForaConfig.fullgraph=False): a model call Dynamo captured as several
graphs, with hook sites between them. `Runtime.piecewise` (fora_fx/runtime.py) decides the
step once per call and opens a `Piece`; each graph run and each hook site's call then asks
the Piece whether its cache may be reused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

if TYPE_CHECKING:
    from .dispatch import CompiledPair
    from .runtime import Branch

PieceKey = tuple["CompiledPair", tuple[int, ...], int]
HookKey = tuple[str, int]  # a hook site's module path, its occurrence in the call


@dataclass
class Piece:
    """A piecewise model call under way: its branch, whether something recomputed, and how
    often each graph (with the parameters it was called with) and each hook site ran so far.

    A graph run or a hook site's call reuses its cache iff that cache was filled since the
    branch's last scheduled refresh (`Branch.period`); else it recomputes and refills it."""

    branch: Branch
    refreshed: bool = False
    seen: dict[Any, int] = field(default_factory=dict)

    def _occurrence(self, what: Any) -> int:
        n = self.seen.get(what, 0)
        self.seen[what] = n + 1
        return n

    def run(self, pair: CompiledPair, args: Sequence[Any],
            stack_inputs: Callable[[CompiledPair, str, Sequence[Any], Any], list]) -> Any:
        """One run of a graph: Dynamo compiles a block's forward once and runs it for every
        block, so its cache is keyed by (graph, the parameters it was called with,
        occurrence)."""
        branch = self.branch
        params = tuple(id(a) for a in args if isinstance(a, torch.nn.Parameter))
        key: PieceKey = (pair, params, self._occurrence((pair, params)))
        buffers = branch.pieces.get(key)
        if buffers is None:
            buffers = branch.pieces[key] = [s.allocate() for s in pair.specs]
        if branch.filled.get(key) == branch.period:
            return pair.reuse(*args, *buffers, *stack_inputs(pair, "reuse", args, key))
        branch.filled.pop(key, None)
        out = pair.refresh(*args, *buffers, *stack_inputs(pair, "refresh", args, key))
        branch.filled[key] = branch.period
        self.refreshed = True
        return out

    def run_module(self, path: str, inputs: Any, call: Callable[[], Any]) -> Any:
        """A hook site's call (fora_fx/hooks.py), keyed by (module path, occurrence).
        `inputs` describes the call's arguments (fora_fx/guards.py: structure, shapes,
        dtypes, devices, scalar values; None if not describable): a call whose inputs differ
        from the refresh's recomputes, as a graph met with new shapes does."""
        branch = self.branch
        key: HookKey = (path, self._occurrence(path))
        stored = branch.outputs.get(key)
        if (branch.filled.get(key) == branch.period and stored is not None
                and inputs is not None and stored[2] == inputs):
            out, versions, _ = stored
            if _versions(out) != versions:
                raise RuntimeError(
                    f"fora_fx: the cached output of hook site {path} was modified in place "
                    "after it was returned (the model writes into that module's output), so "
                    "it cannot be reused. Remove it from ForaConfig.hook_sites."
                )
            return out
        branch.filled.pop(key, None)
        out = call()
        branch.outputs[key] = (out, _versions(out), inputs)
        branch.filled[key] = branch.period
        self.refreshed = True
        return out


def _versions(out: Any) -> tuple[int, ...]:
    return tuple(t._version for t in tree_leaves(out) if isinstance(t, torch.Tensor))
