"""`fora-fx bench --context-parallel N`: the bench model sharded over N ranks with diffusers'
Ulysses context parallelism, uncached (torch.compile) against FORA, run under
`torchrun --nproc-per-node N` (docs/parallel.md). Every rank runs the same loops; rank 0
prints the table. Loop times are the slowest rank's (a barrier closes each loop)."""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

import torch

from .. import api, parallel
from .setup import Setup, build, device_name, sample


def check_launch(degree: int, model: str) -> str | None:
    """Why this process cannot run the CP bench, or None."""
    world = os.environ.get("WORLD_SIZE")
    if world is None:
        return (f"--context-parallel {degree} runs under torchrun: "
                f"torchrun --nproc-per-node {degree} -m fora_fx.cli bench --context-parallel "
                f"{degree} ...")
    if int(world) != degree:
        return f"--context-parallel {degree} needs {degree} processes, torchrun started {world}"
    import diffusers

    from .setup import MODELS

    cls = getattr(diffusers, MODELS[model]["cls"]) if "cls" in MODELS[model] else None
    if getattr(cls, "_cp_plan", None) is None:
        return (f"--model {model} has no context-parallel plan in diffusers (`_cp_plan`): use "
                "a Wan model (tiny-wan, small-wan, wan-1.3b)")
    return None


def run_cp(setup: Setup, degree: int) -> str:
    dist = torch.distributed
    if not dist.is_initialized():
        dist.init_process_group("nccl" if setup.device == "cuda" else "gloo")
    if setup.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    base: Any
    base, inputs = build(setup)
    # Wan's plan also splits a 2-D (Wan 2.2 TI2V) timestep at the model's input; with the 1-D
    # timestep sampled here that entry only logs, which Dynamo cannot put in one graph.
    plan = {k: v for k, v in type(base)._cp_plan.items() if k != ""}

    def sharded() -> torch.nn.Module:
        from diffusers import ContextParallelConfig

        m: Any = copy.deepcopy(base)
        m.set_attention_backend("native")
        m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree), cp_plan=plan)
        return m

    def loop_ms(fn: Any) -> tuple[float, float]:
        times = []
        for _ in range(setup.repeats + 1):  # the first loop compiles: reported apart
            dist.barrier()
            t = time.perf_counter()
            with torch.no_grad():  # inference, as fora_fx's own calls are
                sample(fn, inputs, setup.steps)
            if setup.device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            times.append((time.perf_counter() - t) * 1e3)
        return times[0], statistics.median(times[1:])

    plain = sharded()
    parallel.prepare(plain)  # what fora_fx.transform does for its own capture
    rows = [("compiled (uncached)", *loop_ms(torch.compile(plain, fullgraph=True)))]
    for n in setup.intervals:
        rows.append((f"fora_fx N={n}", *loop_ms(api.transform(sharded(), interval=n,
                                                              num_steps=setup.steps))))
    base_ms = rows[0][2]
    lines = [f"{setup.model}, Ulysses context parallelism over {degree} ranks, "
             f"{device_name(setup.device)}, batch {setup.batch} (x2 CFG), {setup.steps} steps",
             "", "| method | loop ms (median) | first loop ms | speedup |", "|---|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {first:.1f} | {base_ms / ms:.2f}x |"
              for name, first, ms in rows]
    return "\n".join(lines)
