"""explain(): what was cached, what was refused and why, and the rewritten graphs."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .api import ForaModule, reset, runtimes
from .compile import CompiledPair
from .passes import Batched, Refusal, Site, outer_block, path_order
from .runtime import Runtime
from .schedule import Schedule


@dataclass
class Explanation:
    sites: list[Site] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # repeated blocks with no candidate
    # modules of repeated blocks that compute on the token stream outside every site
    uncached: list[str] = field(default_factory=list)
    # fullgraph=False: sites whose graph runs several times per call (a block's own frame,
    # run for every block, each run with its own cache, each site listed per block) -> the
    # number of blocks sharing the graph
    runs: dict[str, int] = field(default_factory=dict)
    hooked: list[str] = field(default_factory=list)  # ForaConfig.hook_sites' modules
    piecewise: bool = False  # ForaConfig.fullgraph=False
    cache_bytes: int = 0
    pruned: int = 0  # adaLN-style Linears narrowed to their live chunks (first graph's reuse)
    batched: dict[str, list[Batched]] = field(default_factory=dict)  # first graph's, by variant
    passes: dict[str, dict[str, int]] = field(default_factory=dict)  # first graph's: what
    # each pass of the rewrite changed, by variant
    graphs_compiled: int = 0  # one per input signature (shapes, dtypes, branch graphs)
    calls: int = 0  # model calls so far, and how many of them recomputed / reused
    refreshes: int = 0
    reuses: int = 0
    unguarded: int = 0  # calls that skipped Dynamo's guards (tuning.fast_calls) ...
    direct: int = 0  # ... and of those, its frame (fora_fx/fastpath.py)
    frame_effects: bool | None = None  # the first graph's frame has Python side effects
    schedule: Schedule | None = None  # ForaConfig.schedule: the listed full steps
    order: int = 0  # ForaConfig(forecast="taylor")'s order; 0: reuse replays
    graphs: dict[str, str] = field(default_factory=dict)  # "refresh"/"reuse" -> Python code
    show_graphs: bool = False

    def __str__(self) -> str:
        mib = self.cache_bytes / 2**20
        lines = [
            f"fora_fx: {len(self.sites)} cached sites, {mib:.2f} MiB cache, "
            f"{self.graphs_compiled} graph(s); {self.calls} calls: "
            f"{self.refreshes} recomputed, {self.reuses} reused; {self.unguarded} skipped "
            f"Dynamo's guards, {self.direct} of them its frame too"
        ]
        if self.schedule is not None:
            lines.append(f"schedule: {self.schedule}")
        if self.order:
            lines.append(f"forecast: taylor, order {self.order} ({self.order + 1} buffers per "
                         "cached output, and a step clock per graph)")
        if self.frame_effects:
            lines.append("Dynamo's frame has Python side effects: every call is guarded")
        w = max((len(s.module_path) for s in self.sites), default=10)
        for s in self.sites:
            shapes = ", ".join("x".join(map(str, sh)) for sh in s.shapes)
            count = self.runs.get(s.module_path, 1)
            lines.append(
                f"  {s.name:<14} {s.module_path:<{w}}  {s.kind:<10} [{shapes}] {s.nbytes} B"
                + (f"  (one graph for {count} blocks, a cache each)" if count > 1 else "")
            )
        if self.hooked:
            lines.append(
                "cached around the module call (hook_sites: eager on refresh steps, outside "
                f"the graphs): {_ranges(self.hooked)}"
            )
        for variant, counts in self.passes.items():
            lines.append(f"{variant} passes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if self.pruned:
            lines.append(f"reuse graph: {self.pruned} chunked Linear(s) narrowed to live chunks")
        for variant, runs in self.batched.items():
            for b in runs:
                lines.append(
                    f"{variant} graph: {b.prefix} x{len(b.blocks)}: {b.nodes} conditioning "
                    f"nodes per block run once, vmapped over {len(b.stacks)} parameter stacks"
                )
        if self.refused:
            lines.append("not cached:")
            lines += [f"  {r.module_path} ({r.kind}): {r.reason}" for r in self.refused]
        if self.uncovered:
            lines.append(
                "repeated blocks with no attention or MLP found (whatever mixes their tokens "
                f"runs on every step): {_ranges(self.uncovered)}"
            )
        if self.uncached:
            lines.append(
                "token-stream projections outside every attention / MLP found (they run on "
                f"every step): {_ranges(self.uncached)}"
            )
            if self.piecewise:
                lines.append(
                    "  (a module Dynamo cannot capture whole, such as a mixture of experts, "
                    "can be cached around its call: "
                    "fora_fx.Piecewise(hook_sites=(\"<path pattern>\",)))"
                )
        if self.show_graphs:
            for name, code in self.graphs.items():
                lines += [f"--- {name} graph ---", code]
        return "\n".join(lines)


def _ranges(paths: list[str]) -> str:
    """["blocks.0", "blocks.1", "blocks.3"] -> "blocks.0-1, blocks.3";
    ["blocks.1.attn", "blocks.2.attn"] -> "blocks.1-2.attn"."""
    runs: list[tuple[str, int, int, str]] = []
    for path in paths:
        m = re.match(r"^(.*?)\.(\d+)((?:\.\D[^.]*)*)$", path)
        if m is None:
            runs.append((path, -1, -1, ""))
            continue
        container, i, rest = m.group(1), int(m.group(2)), m.group(3)
        last = runs[-1] if runs else None
        if last and last[0] == container and last[3] == rest and last[2] == i - 1:
            runs[-1] = (container, last[1], i, rest)
        else:
            runs.append((container, i, i, rest))
    return ", ".join(
        c if a < 0 else f"{c}.{a}" + (f"-{b}" if b > a else "") + rest
        for c, a, b, rest in runs
    )


def readable(code: str) -> str:
    """GraphModule code without Dynamo's input aliases and `x = None` frees."""
    out = []
    for line in code.splitlines():
        if re.fullmatch(r"\s+\w+ = L_\w+", line) or not line.strip():
            continue
        out.append(re.sub(r";\s+[\w\s=]+ = None$", "", line))
    return "\n".join(out)


def _block_runs(rt: Runtime) -> dict[str, tuple[bool, list[str]]]:
    """For each site (True) or uncached module (False) of a graph that ran several times per
    call (piecewise: Dynamo compiled a block's own frame once and runs it for every block),
    its path in each run: the block is the one whose parameters the run was called with
    ("blocks.0.attn" for the graph's first block -> "blocks.2.attn" for the run with
    blocks.2's weights)."""
    model = rt.model
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    keys: dict[CompiledPair, dict[tuple[tuple[int, ...], int], None]] = {}
    for branch in rt.branches.values():
        for pair, params, occurrence in branch.pieces.buffers:
            keys.setdefault(pair, {})[(params, occurrence)] = None
    out: dict[str, tuple[bool, list[str]]] = {}
    for pair, runs in keys.items():
        if len(runs) < 2:
            continue
        named = [(s.module_path, True) for s in pair.sites]
        for path, is_site in named + [(m, False) for m in pair.located.uncached]:
            base = outer_block(path)
            paths = []
            for params, occurrence in runs:
                blocks = {outer_block(names[i]) for i in params if i in names} - {None}
                if base is not None and len(blocks) == 1:
                    paths.append(f"{blocks.pop()}{path[len(base):]}")
                else:  # not named by its weights: numbered by its occurrence
                    paths.append(f"{path}#{occurrence}")
            # Several graphs may hold the same module (an expert loop's pieces): their
            # runs add up, the last graph's must not replace the first's.
            seen = out[path][1] if path in out else []
            out[path] = (is_site, list(dict.fromkeys(seen + paths)))
    return out


def _pairs(obj: Any) -> list[CompiledPair]:
    return [p for rt in runtimes(obj) for p in rt.pairs]


def explain(obj: Any, *args: Any, graph: bool = False, **kwargs: Any) -> Explanation:
    """Describes the FORA rewrite of a transformed (or backend="fora") model.

    If the model has not run yet, pass example inputs: it is called once to capture it and
    then reset, so the next call starts a fresh generation.
    """
    if not _pairs(obj):
        if not (args or kwargs):
            raise ValueError(
                "fora_fx.explain: the model has not been captured yet; call it once or pass "
                "example inputs: fora_fx.explain(model, *args, **kwargs)"
            )
        if not isinstance(obj, ForaModule) and not hasattr(obj, "_orig_mod"):
            raise TypeError("fora_fx.explain(model, inputs) needs a transformed or compiled model")
        obj(*args, **kwargs)
        reset(obj)
    # Every compiled graph (input shapes, guidance branches such as SD3's skip-layer call,
    # which skips whole blocks) contributes its sites; each module is listed once.
    pairs = _pairs(obj)
    sites: dict[str, Site] = {}
    refused: dict[tuple[str, str], Refusal] = {}
    uncovered: dict[str, None] = {}
    uncached: dict[str, None] = {}
    for p in pairs:
        uncovered.update(dict.fromkeys(p.located.uncovered))
        uncached.update(dict.fromkeys(p.located.uncached))
        for s in p.sites:
            sites.setdefault(s.module_path, s)
        for r in p.located.refused:
            refused.setdefault((r.module_path, r.reason), r)
    # fullgraph=False: a graph compiled from a block's own frame runs for every block; its
    # sites are listed once per block it ran for.
    runs: dict[str, int] = {}
    for rt in runtimes(obj):
        for first, (is_site, paths) in _block_runs(rt).items():
            if not is_site:
                if first in uncached:
                    del uncached[first]
                    uncached.update(dict.fromkeys(paths))
                continue
            site = sites.pop(first, None)
            for path in paths:
                if site is not None:
                    sites.setdefault(path, dataclasses.replace(site, module_path=path))
                runs[path] = max(runs.get(path, 1), len(paths))
    listed = list(sites.values())
    if runs:  # per-block copies follow their graph: list the sites in block order
        listed.sort(key=lambda s: path_order(s.module_path))
    pair = pairs[0]  # the first graph compiled; its rewritten code is what graph=True prints
    stats = [rt.snapshot() for rt in runtimes(obj)]
    return Explanation(
        sites=listed,
        refused=list(refused.values()),
        runs=runs,
        uncovered=[b for b in uncovered if not any(s.startswith(b + ".") for s in sites)],
        uncached=sorted((m for m in uncached if m not in sites), key=path_order),
        hooked=[p for rt in runtimes(obj) for p in rt.hooked],
        piecewise=any(rt.config.piecewise is not None for rt in runtimes(obj)),
        graphs_compiled=len(pairs),
        pruned=pair.pruned,
        batched=pair.batched,
        passes=pair.counts,
        cache_bytes=sum(s.cache_bytes for s in stats),
        calls=sum(s.calls for s in stats),
        refreshes=sum(s.refreshes for s in stats),
        reuses=sum(s.reuses for s in stats),
        unguarded=sum(s.unguarded for s in stats),
        direct=sum(s.direct for s in stats),
        frame_effects=pair.frame_effects,
        schedule=next((rt.config.schedule for rt in runtimes(obj)), None),
        order=max((rt.config.taylor_order for rt in runtimes(obj)), default=0),
        graphs={k: readable(g.code) for k, g in pair.graphs.items()},
        show_graphs=graph,
    )
