"""FORA under diffusers' context parallelism, 2 processes over gloo (CPU, loopback).

Run by tests/test_context_parallel.py as
    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port <free> cp_worker.py
Each rank prints `CP <json>` lines; rank 0 prints `CP-DONE` last. The user code under test
is docs/parallel.md's example, exec'd verbatim from the page.
"""

from __future__ import annotations

import copy
import json
import pathlib
import re
import sys
import time

import torch
import torch.distributed as dist

T0 = time.time()
torch.set_num_threads(1)
dist.init_process_group("gloo")
RANK = dist.get_rank()
if torch.accelerator.device_count() == 0:
    # diffusers 0.42.1 ModelMixin._resolve_parallel_config computes
    # `rank % torch.accelerator.device_count()`, 0 on a CPU-only torch (ZeroDivisionError):
    # a diffusers limitation on CPU, worked around here, not in fora_fx (docs/parallel.md).
    torch.accelerator.device_count = lambda: 1

from diffusers import (  # noqa: E402
    ContextParallelConfig,
    FluxTransformer2DModel,
    WanTransformer3DModel,
)

import fora_fx  # noqa: E402
from fora_fx import parallel  # noqa: E402

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "parallel.md"
EXAMPLE = re.search(r"exec'd verbatim.*?\n```python\n(.*?)```", DOCS.read_text(), re.S)
assert EXAMPLE is not None, "docs/parallel.md lost its tested example"
example: dict = {}
exec(EXAMPLE.group(1), example)  # noqa: S102 - the documented user code is what is tested
shard_and_cache = example["shard_and_cache"]

STEPS, INTERVAL, COMPILER = 6, 3, "aot_eager"  # refresh at 0, 3 and 5 (refresh_last)
COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "wait_tensor")


def report(**kw: object) -> None:
    # One write per line: both ranks share the pipe, and print() writes the text and its
    # newline separately, so two ranks' lines could interleave (seen under load).
    line = "CP " + json.dumps({"rank": RANK, "t": round(time.time() - T0, 1), **kw}) + "\n"
    sys.stdout.write(line)
    sys.stdout.flush()


def build(name: str) -> tuple[torch.nn.Module, dict, str, object]:
    """A tiny random-weight transformer (same seed on every rank), its inputs, the input that
    the sampler updates, and the cp_plan to use (None: the model's own)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "wan":
        m = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
                      timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                      return_dict=False)
        # Wan's plan splits a 2-D (Wan 2.2 TI2V) timestep at the model's input; given a 1-D
        # one it calls logger.warning_once, which Dynamo cannot capture in one graph.
        plan = {k: v for k, v in WanTransformer3DModel._cp_plan.items() if k != ""}
        return m.eval(), inputs, "hidden_states", plan
    m = FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
    img_ids = torch.stack([torch.zeros(16), torch.arange(16.0) // 4, torch.arange(16.0) % 4], 1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(8, 3),
                  return_dict=False)
    return m.eval(), inputs, "hidden_states", None


def sample(fn: object, inputs: dict, key: str) -> list[torch.Tensor]:
    """A sampler's loop: each step's input is the last one moved by the model's output."""
    inputs, outs = dict(inputs), []
    with torch.no_grad():
        for _ in range(STEPS):
            out = fn(**inputs)[0]  # type: ignore[operator]
            outs.append(out)
            inputs[key] = inputs[key] - 0.1 * out
    return outs


def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def count(code: str) -> dict[str, int]:
    return {c: code.count(f"_c10d_functional.{c}(") for c in COLLECTIVES}


def enable(m: torch.nn.Module, plan: object) -> None:
    m.set_attention_backend("native")
    m.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2), cp_plan=plan)


def check_model(name: str) -> None:
    model, inputs, key, plan = build(name)
    fora = dict(interval=INTERVAL, num_steps=STEPS, compiler=COMPILER)

    # Single-process FORA (no CP yet, so no collective: every rank computes it whole).
    single = fora_fx.transform(copy.deepcopy(model), **fora)
    ref = sample(single, inputs, key)
    ref_history = fora_fx.stats(single).history

    # The documented order: enable context parallelism, then transform (docs example).
    fast = shard_and_cache(copy.deepcopy(model), cp_plan=plan, **fora)
    out = sample(fast, inputs, key)
    history = fora_fx.stats(fast).history
    histories: list = [None, None]
    dist.all_gather_object(histories, history)
    graphs = fora_fx.explain(fast, graph=True).graphs
    report(model=name, case="fora_cp_vs_single", max_abs=diff(out, ref),
           history=history, ref_history=ref_history, histories=histories,
           refresh=count(graphs["refresh"]), reuse=count(graphs["reuse"]))

    # interval=1 under CP equals the sharded uncached model (eager, CP hooks run as written).
    plain = copy.deepcopy(model)
    enable(plain, plan)
    uncached = sample(plain, inputs, key)
    every = fora_fx.transform(copy.deepcopy(plain), interval=1, compiler=COMPILER)
    report(model=name, case="interval1_vs_uncached_cp", max_abs=diff(sample(every, inputs, key),
                                                                      uncached),
           single_vs_cp_uncached=diff(uncached, sample(model, inputs, key)))

    if name != "wan":  # the other order once: the compile costs ~6 s of the test's budget
        return
    # The other order: transform, then enable parallelism on the transformed model.
    other = fora_fx.transform(copy.deepcopy(model), **fora)
    enable(other, plan)  # reaches the wrapped model (ForaModule delegates attributes)
    out2 = sample(other, inputs, key)
    report(model=name, case="transform_then_enable", max_abs=diff(out2, ref),
           history=fora_fx.stats(other).history,
           refresh=count(fora_fx.explain(other, graph=True).graphs["refresh"]))


def check_drift() -> None:
    """Ranks whose schedules diverge raise instead of hanging or mixing collectives."""
    model, inputs, key, plan = build("wan")
    fast = shard_and_cache(copy.deepcopy(model), cp_plan=plan, interval=INTERVAL,
                           compiler="eager")
    with torch.no_grad():
        for _ in range(2):
            fast(**inputs)
        if RANK == 1:
            fora_fx.reset(fast)  # on one rank only: rank 1 is at step 0, rank 0 at step 2
        try:
            fast(**inputs)
            report(case="drift_reset", raised=None)
        except RuntimeError as e:
            report(case="drift_reset", raised=str(e)[:400])
    # Rank 1 makes one call more than rank 0, which has moved on (to a barrier): rank 1's
    # check waits for a peer that never comes and must raise after its timeout, not hang.
    # a new check group: this model's first call makes it. 10 s: the ranks reach that first
    # call's check at times that differ by their compile times, more on a loaded machine
    parallel.CHECK_TIMEOUT_S = 10.0
    fresh = shard_and_cache(copy.deepcopy(model), cp_plan=plan, interval=INTERVAL,
                            compiler="eager")
    with torch.no_grad():
        fresh(**inputs)
        raised = None
        t = time.time()
        try:
            if RANK == 1:
                fresh(**inputs)  # the extra call
        except RuntimeError as e:
            raised = str(e)[:400]
        report(case="drift_extra_call", raised=raised, waited=round(time.time() - t, 1),
               step=fora_fx.stats(fresh).step)
    dist.barrier()


def main() -> None:
    which = sys.argv[1:] or ["wan", "flux", "drift"]
    for name in which:
        if name == "drift":
            check_drift()
        else:
            check_model(name)
    report(case="done")


if __name__ == "__main__":
    main()
