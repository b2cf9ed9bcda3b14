"""FORA under diffusers' context parallelism (`model.enable_parallelism(config=
ContextParallelConfig(...))`, docs/parallel.md).

Every rank runs the same FORA schedule by construction: the same calls, the same step counter.
Nothing else keeps the ranks in step, and a rank whose schedule drifted (one call more or
less, a `fora_fx.reset` on one rank only, another interval) would run the refresh graph
while the others run the reuse graph: their collectives no longer pair up, and the ranks
hang or exchange the wrong tensors. So before every graph run the ranks of the
context-parallel group compare their positions (8 ints over a CPU gloo group of their own:
a host-to-host exchange, no device sync) and raise on a mismatch. On reuse steps too: the
first call at which two ranks differ may be one where one refreshes and the other reuses
(a rank that made one extra call at step 0 agrees with the others there), and once their
graphs differ nothing pairs the collectives again. A rank whose peers do not arrive (they
are inside a graph waiting for it) raises after `CHECK_TIMEOUT_S` instead of hanging.

`prepare` lets Dynamo capture a model whose CP hooks were never run: diffusers'
input-split hook looks its parameters up with `inspect.signature` on its first call, which
Dynamo cannot trace; filling that lookup's cache first, with the same values, is what an
eager call would have done.
"""

from __future__ import annotations

import datetime
import inspect
import zlib
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

# How long a refreshing rank waits for the other ranks' positions. A legitimate wait is the
# other ranks finishing the previous step (their host runs ahead of the device) or compiling
# a graph; a rank that is not at a refresh step never arrives.
CHECK_TIMEOUT_S = 600.0

_groups: dict[tuple[tuple[int, ...], float], Any] = {}
_prepared: WeakIdKeyDictionary = WeakIdKeyDictionary()  # model -> the parallel config seen


def cp_group(model: Any) -> Any | None:
    """The process group of `model`'s context parallelism, or None (no CP, or one rank)."""
    # diffusers' enable_parallelism sets it on the instance: a dict lookup, which costs a
    # model without CP (every call of every transformed model comes here) ~50 ns
    config = vars(model).get("_parallel_config")
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or not torch.distributed.is_initialized():
        return None
    group = mesh.get_group()
    return group if torch.distributed.get_world_size(group) > 1 else None


def prepare(model: Any) -> None:
    """Before Dynamo traces `model`: fill the parameter-index cache of each of diffusers'
    context-parallel split hooks (what their first eager call computes, identically)."""
    config = vars(model).get("_parallel_config")
    if config is None or _prepared.get(model) is config:  # guarded calls: once per config
        return
    _prepared[model] = config
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            meta = getattr(hook, "module_forward_metadata", None)
            cls = getattr(meta, "_cls", None)
            if meta is not None and cls is not None and meta.cached_parameter_indices is None:
                # diffusers/hooks/context_parallel.py, ModuleForwardMetadata: the forward's
                # parameters after `self`, by position
                names = list(inspect.signature(cls.forward).parameters)[1:]
                meta.cached_parameter_indices = {name: i for i, name in enumerate(names)}


def check(model: Any, config: Any, branch: str, step: int, num_steps: int | None,
          refresh: bool, calls: int) -> None:
    """Before a graph run: every rank of `model`'s CP group is at the same position and runs
    the same variant, else RuntimeError. No-op without context parallelism."""
    group = cp_group(model)
    if group is None:
        return
    ranks = tuple(torch.distributed.get_process_group_ranks(group))
    key = (ranks, CHECK_TIMEOUT_S)
    if key not in _groups:
        # Its own gloo group: CPU ints whatever the model's backend (NCCL would need a device
        # sync to read them), and never interleaved with the graphs' collectives.
        _groups[key] = torch.distributed.new_group(
            list(ranks), backend="gloo", use_local_synchronization=True,
            timeout=datetime.timedelta(seconds=CHECK_TIMEOUT_S))
    mine = torch.tensor([zlib.crc32(branch.encode()), step,
                         -1 if num_steps is None else num_steps, int(refresh), calls,
                         config.interval, config.warmup_steps, int(config.refresh_last)],
                        dtype=torch.int64)
    seen = [torch.empty_like(mine) for _ in ranks]
    try:
        torch.distributed.all_gather(seen, mine, group=_groups[key])
    except RuntimeError as e:  # gloo's timeout, a peer gone (DistBackendError is one)
        raise RuntimeError(
            f"fora_fx: context-parallel rank {torch.distributed.get_rank()} (step {step}, "
            f"call {calls}, {'refresh' if refresh else 'reuse'}) waited {CHECK_TIMEOUT_S:g} s "
            f"for the other ranks of its group {list(ranks)} to reach their next call: their "
            "FORA schedules diverged (a rank called the model a different number of times), "
            "so their collectives no longer pair up. Every rank must make the same calls. "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from e
    rows = [tuple(t.tolist()) for t in seen]
    if len(set(rows)) > 1:
        fields = "(branch crc32, step, num_steps, refresh, calls, interval, warmup, last)"
        raise RuntimeError(
            "fora_fx: context-parallel ranks are at different FORA positions, rank by rank "
            f"{fields}: " + ", ".join(f"{r}: {row}" for r, row in zip(ranks, rows, strict=True))
            + ". Every rank must make the same calls with the same config (same interval, "
            "num_steps; fora_fx.reset on all ranks or none), else the ranks run different "
            "graphs and their collectives do not pair up.")
