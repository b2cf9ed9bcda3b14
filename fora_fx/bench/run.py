"""`fora-fx bench`'s run: every method on its own copy of one model, in one process, on one
device; a row per method."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import api, tuning
from ..capture import capture, module_paths
from ..config import ForaConfig, Piecewise
from ..explain import explain
from ..passes import locate
from ..peers import DiffusersHook, HookFora
from .progress import bar
from .setup import MODELS, Row, Setup, build, device_name, piecewise, sample
from .timing import CompileCaches, kernel_profile, measure, paired, step_times, unguarded


def run(setup: Setup, log: Callable[[str], None] = print,
        checkpoint: Callable[[list[Row]], None] | None = None, quiet: bool = False) -> list[Row]:
    """All rows, in order. `checkpoint(rows)` runs after each row (a GPU run that hits its
    time limit still leaves what it measured). Every row's loops are timed interleaved with
    the eager model's (timing.paired), so each speedup comes from rounds run back to back."""
    with bar(_row_count(setup), f"bench {setup.model}", quiet, unit="row") as progress:
        return _run(setup, log, checkpoint, progress)


def _row_count(setup: Setup) -> int:
    peers = len(setup.intervals) + 2 + 1 + setup.compiled_peers if setup.peers else 0
    return 2 + len(setup.intervals) * (1 + setup.forecast) \
        + (setup.ablation and 3 in setup.intervals) + peers


def _run(setup: Setup, log: Callable[[str], None],
         checkpoint: Callable[[list[Row]], None] | None, progress: Any) -> list[Row]:
    from torch._dynamo.utils import counters

    base, inputs = build(setup)
    # Each method gets its own copy on the device and frees it afterwards, so a row's peak
    # memory is one model plus what the method itself holds.
    base = base.cpu()

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base).to(setup.device)

    call0 = {k: v for k, v in inputs.items() if k != "noise"}
    x0 = torch.cat([inputs["noise"]] * 2)
    whole = not piecewise(setup.model)  # else the model's own code breaks Dynamo's graph
    sites = _site_paths(fresh(), x0, call0, whole)
    name = device_name(setup.device)
    rows: list[Row] = []
    refs: dict[int, torch.Tensor] = {}
    mode = "reduce-overhead" if setup.device == "cuda" else None
    caches = CompileCaches()  # cold compiles per family of rows: comparable warm-up times
    caches.prime(setup.device, mode)

    def record(row: Row, fn: Callable[[], torch.Tensor],
               ref: torch.Tensor | None = None) -> torch.Tensor | None:
        _release(setup.device)  # earlier rows' compiled code, CUDA graph pools and models
        counters.clear()
        family = "compiled" if row.method == "compiled" else (
            "fora_fx" if row.method.startswith("fora_fx") else "peers")
        progress.set_postfix_str(f"{row.method} N={row.interval or '-'}")
        with caches.use(family):
            try:
                with torch.no_grad():
                    row.warmup_s, out, warm_graphs = measure(fn, setup)
                    eager.to(setup.device)  # held on the device only while timing
                    timing = paired(fn, None if row.method == "eager" else eager_loop,
                                    row.method, setup)
                    eager.cpu()
            except Exception as e:  # a peer that fails here is reported, not fatal
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                add(row)
                log(f"{row.method}: {row.note}")
                return None
            row.loop_s = timing.seconds(row.method)
            row.timing = timing.to_json()
            if family != "peers":
                t = unguarded(fn, setup)
                row.loop_s_unguarded = None if t is None else row.loop_s / t.speedup(
                    "unguarded")
        row.cudagraph_skips = int(counters["inductor"].get("cudagraph_skips", 0))
        row.graphs_compiled = int(counters["stats"].get("unique_graphs", 0))
        row.recompiles = row.graphs_compiled - warm_graphs
        if ref is not None:
            row.max_dev_vs_hook_fora = float((out.float() - ref.float()).abs().max())
        if setup.device == "cuda":
            row.peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
        row.device = name
        add(row)
        log(f"{row.method:<22} N={row.interval or '-'}  {row.loop_s:.4f} s  "
            f"{'' if row.method == 'eager' else timing.describe(row.method) + ' over eager'}  "
            f"{row.note}")
        return out

    def add(row: Row) -> None:
        rows.append(row)
        _speedups(rows)
        progress.update()
        if checkpoint is not None:
            checkpoint(rows)

    def sampler(m: Any, on_step: Callable[[int], None] | None = None,
                before: Callable[[], None] | None = None) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            if before is not None:
                before()
            return sample(m, inputs, setup.steps, on_step=on_step)
        return fn

    eager = base.to(setup.device)  # the reference every row is timed against
    eager_loop = sampler(eager)
    with torch.no_grad():
        eager_loop()  # untimed: its first-call costs stay out of the first row's rounds
    eager.cpu()  # on the device only while a row is timed
    eager_out = record(Row("eager", None), sampler(fresh()))
    compiled = torch.compile(fresh(), fullgraph=whole, dynamic=False, mode=mode)
    out = record(Row("compiled", None, note=f"mode={mode or 'default'}"
                     + ("" if whole else ", with graph breaks")), sampler(compiled))
    if out is not None and eager_out is not None:
        rows[-1].max_dev_vs_eager = float((out.float() - eager_out.float()).abs().max())
    del compiled
    for n in setup.intervals:
        hook_model = fresh()
        loop = sampler(hook_model, before=HookFora(hook_model, sites, n).start_generation)
        if setup.peers:
            ref = record(Row("hook-fora (official)", n), loop)
        else:  # not a row, but still the reference every fora_fx row is checked against
            with torch.no_grad():
                ref = loop()
        if ref is not None:
            refs[n] = ref
        del hook_model, loop
    pieces = None if whole else Piecewise()
    variants: list[tuple[str, int, ForaConfig, dict[str, Any]]] = [
        ("fora_fx", n, ForaConfig(interval=n, mode=mode, piecewise=pieces), {})
        for n in setup.intervals]
    if setup.forecast:  # the same full steps, reuse steps forecast (no reference: not FORA)
        variants += [("fora_fx taylor-2", n, ForaConfig(
            interval=n, mode=mode, piecewise=pieces, forecast="taylor", order=2), {})
            for n in setup.intervals]
    if setup.ablation and 3 in setup.intervals:  # what the batch pass + fusion limit buy
        variants.append(("fora_fx -batch -limit", 3, ForaConfig(
            interval=3, mode=mode, piecewise=pieces),
            {"batch_blocks": False, "reuse_fusion_limit": None}))
    for method, n, cfg, tune in variants:
        with tuning.patch(**tune):
            fast = api.transform(fresh(), cfg)
        out = record(Row(method, n), sampler(fast, before=functools.partial(api.reset, fast)),
                     ref=None if cfg.forecast else refs.get(n))
        if out is not None:
            rows[-1].cache_mib = explain(fast).cache_bytes / 2**20
            stats = api.stats(fast)
            rows[-1].direct_share = stats.direct / max(stats.calls, 1)
            if n > 1:
                rows[-1].refresh_ms, rows[-1].reuse_ms = step_times(fast, x0, call0, setup)
            if setup.profile and n == 3:
                rows[-1].profile = kernel_profile(fast, x0, call0, setup)
                if checkpoint is not None:
                    checkpoint(rows)
        del fast
    if not setup.peers:
        return rows
    for kind in ("taylorseer", "pab"):
        n = 3
        current = {"t": 999}  # PAB reads the step's timestep through a callback
        m = fresh()
        try:
            hook = DiffusersHook(m, kind, n, timestep=functools.partial(current.__getitem__, "t"),
                                 site_paths=sites)
        except Exception as e:
            add(Row(f"diffusers {kind}", n, device=name,
                    note=f"skipped: {type(e).__name__}: {e}"[:160]))
            continue
        record(Row(f"diffusers {kind}", n), sampler(
            hook, on_step=functools.partial(current.__setitem__, "t"),
            before=hook.start_generation))
    _cache_dit_rows(setup, fresh, name, record, add, sampler)
    return rows


def _site_paths(model: torch.nn.Module, x: torch.Tensor, kwargs: dict[str, Any],
                whole: bool) -> list[str]:
    """The module paths fora_fx caches: the modules the hook-based peers wrap."""
    t = torch.ones(x.shape[0], device=x.device)
    if whole:
        gm, _ = capture(model, x, timestep=t, **kwargs)
        sites = [s.module_path for s in locate(gm, module_paths(model)).sites]
    else:  # one graph per piece: ask a piecewise transform what it cached
        fast = api.transform(model, ForaConfig(piecewise=Piecewise(), compiler="eager"))
        with torch.no_grad():
            fast(x, timestep=t, **kwargs)
        sites = [s.module_path for s in explain(fast).sites]
        api.restore(fast)
    torch._dynamo.reset()  # also forgets the frames a piecewise capture made Dynamo skip
    return sites


def _release(device: str) -> None:
    import gc

    torch._dynamo.reset()  # also frees CUDA-graph trees' memory pools
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _speedups(rows: list[Row]) -> None:
    """From each row's own rounds against the eager model: the median per-round speedup over
    eager and its range; over compiled, the ratio of the two rows' medians over eager."""
    comp = next((r for r in rows if r.method == "compiled" and r.timing), None)
    for r in rows:
        if not r.timing:
            continue
        if r.method == "eager":
            r.speedup_vs_eager = 1.0
        else:
            s = r.timing["speedups"][r.method]
            r.speedup_vs_eager, r.speedup_vs_eager_lo, r.speedup_vs_eager_hi = (
                s["median"], s["lo"], s["hi"])
        if comp is not None and comp.speedup_vs_eager:
            r.speedup_vs_compiled = r.speedup_vs_eager / comp.speedup_vs_eager


def _cache_dit_rows(setup: Setup, fresh: Callable[[], torch.nn.Module], name: str,
                    record: Callable,
                    add: Callable[[Row], None], sampler: Callable) -> None:
    """cache-dit's DBCache (F1B0, static mask every 3rd step), eager and, where it works,
    under torch.compile (cache-dit decides in Python, so expect graph breaks)."""
    from .. import peers_cachedit

    if not peers_cachedit.available():
        add(Row("cache-dit", 3, device=name, note="skipped: cache_dit not installed"))
        return
    if MODELS[setup.model]["cls"] != "DiTTransformer2DModel":
        add(Row("cache-dit", 3, device=name, note="skipped: the adapter covers DiT only"))
        return
    kinds = [("cache-dit", False)] + ([("cache-dit + compile", True)]
                                      if setup.compiled_peers else [])
    for method, compiled in kinds:
        with _compile_configs_restored():
            try:
                peer = peers_cachedit.CacheDitPeer(fresh(), 3, setup.steps)
                fn: Any = peer
                if compiled:
                    import cache_dit

                    cache_dit.set_compile_configs()  # its recommended setup, for its row only
                    fn = torch.compile(peer.model, dynamic=False)
            except Exception as e:
                add(Row(method, 3, device=name, note=f"skipped: {type(e).__name__}: {e}"[:160]))
                continue
            record(Row(method, 3, note="DBCache F1B0, static mask"),
                   sampler(fn, before=peer.start_generation))


@contextlib.contextmanager
def _compile_configs_restored() -> Iterator[None]:
    """Dynamo's and Inductor's global configs as they were before the block. cache-dit's
    `set_compile_configs` assigns them for the whole process (recompile_limit 1024 among
    others), which changed every later compile in the process, the caller's included."""
    import torch._inductor.config as inductor_config

    saved = [(c, c.get_config_copy()) for c in (torch._dynamo.config, inductor_config)]
    try:
        yield
    finally:
        for config, before in saved:
            now = config.get_config_copy()
            for key, value in before.items():
                if now.get(key) != value:
                    setattr(config, key, value)


