"""`fora-fx bench`: FORA against eager, torch.compile and the peers, one run, one device.

    fora-fx bench [--model dit-xl-2|pixart-512|tiny] [--batch 2] [--steps 50] [--json PATH]
    fora-fx bench --quick          # tiny config on CPU: keeps the harness from rotting in CI

Each method samples the same 50-step DDIM loop with classifier-free guidance batched
(batch images + batch uncond) on its own copy of one random-weight model. A row: loop time
(median of repeats, device-synchronized, after one untimed warm-up loop), speedup over eager
and over compiled, compile warm-up (the first loop), cudagraph skips, Dynamo graphs compiled,
peak memory, cache bytes, max deviation from the official-style eager FORA at the same
interval, and the device's name.
"""

from __future__ import annotations

import copy
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import api
from .capture import capture, module_paths
from .config import ForaConfig
from .explain import explain
from .passes import locate
from .peers import DiffusersHook, HookFora

MODELS: dict[str, dict[str, Any]] = {
    # diffusers DiT-XL/2 at 256x256 (32x32 latents), the config DiT-XL-2-256 ships
    "dit-xl-2": dict(cls="DiTTransformer2DModel", num_layers=28, num_attention_heads=16,
                     attention_head_dim=72, in_channels=4, out_channels=8, sample_size=32,
                     patch_size=2, num_embeds_ada_norm=1000),
    # PixArt-alpha XL/2 at 512x512 (64x64 latents), with cross-attention to T5 tokens
    "pixart-512": dict(cls="PixArtTransformer2DModel", num_layers=28, num_attention_heads=16,
                       attention_head_dim=72, in_channels=4, out_channels=8, sample_size=64,
                       patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                       use_additional_conditions=False),
    "tiny": dict(cls="DiTTransformer2DModel", num_layers=2, num_attention_heads=2,
                 attention_head_dim=16, in_channels=4, out_channels=8, sample_size=8,
                 patch_size=2, num_embeds_ada_norm=1000),
    # the PixArt path of the harness (caption tokens, cross-attention), CPU-sized
    "tiny-pixart": dict(cls="PixArtTransformer2DModel", num_layers=2, num_attention_heads=2,
                        attention_head_dim=16, in_channels=4, out_channels=8, sample_size=8,
                        patch_size=2, cross_attention_dim=32, caption_channels=24,
                        use_additional_conditions=False),
}


@dataclass
class Row:
    method: str
    interval: int | None
    loop_s: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    warmup_s: float | None = None
    cudagraph_skips: int | None = None
    graphs_compiled: int | None = None  # Dynamo graphs compiled, warm-up loop included
    recompiles: int | None = None  # graphs compiled during the timed loops: should be 0
    peak_mem_mib: float | None = None
    cache_mib: float | None = None
    max_dev_vs_hook_fora: float | None = None
    max_dev_vs_eager: float | None = None  # the compiled row: what compiling alone changes
    refresh_ms: float | None = None  # one transformer call that recomputes (fora_fx rows)
    reuse_ms: float | None = None  # one that reuses: FORA's per-step floor
    # the same loop under torch.compiler.set_stance(skip_guard_eval_unsafe=True): what
    # Dynamo's per-call guard checks cost (compiled and fora_fx rows)
    loop_s_unguarded: float | None = None
    # --profile: per step variant, {"kernels": n, "device_us": t, "top": [[name, n, us], ...]}
    profile: dict[str, Any] | None = None
    device: str = ""
    note: str = ""


@dataclass
class Setup:
    model: str = "dit-xl-2"
    batch: int = 1  # images; the model sees 2 * batch (CFG)
    steps: int = 50
    repeats: int = 3
    intervals: tuple[int, ...] = (2, 3, 4, 6)
    ablation: bool = True  # also fora_fx N=3 without the batch pass and the fusion limit
    profile: bool = False  # kernel-level profile of one refresh and one reuse step (N=3 rows)
    compiled_peers: bool = True  # also try cache-dit under torch.compile
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def build(setup: Setup) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The random-weight model and the sampler's inputs: noise and conditioning."""
    import diffusers

    spec = dict(MODELS[setup.model])
    torch.manual_seed(0)
    model = getattr(diffusers, spec.pop("cls"))(**spec).eval()
    with torch.no_grad():  # adaLN-Zero initialises gates to zero: make every block count
        for p in model.parameters():
            if not bool(p.ne(0).any()):
                p.normal_(0, 0.02)
    model = model.to(setup.device, setup.dtype)
    n, side = 2 * setup.batch, spec["sample_size"]
    g = torch.Generator().manual_seed(1)
    extra: dict[str, Any] = {}
    if "caption_channels" in spec:
        emb = torch.randn(n, 120, spec["caption_channels"], generator=g)
        extra = dict(encoder_hidden_states=emb.to(setup.device, setup.dtype),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    else:
        labels = [207] * setup.batch + [1000] * setup.batch  # cond, then the null class
        extra = dict(class_labels=torch.tensor(labels, device=setup.device))
    noise = torch.randn(setup.batch, 4, side, side, generator=g).to(setup.device, setup.dtype)
    return model, dict(noise=noise, **extra)


def sample(model: Callable[..., Any], inputs: dict[str, Any], steps: int, cfg: float = 4.0,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM (eta 0) with batched classifier-free guidance; host-side control only."""
    from diffusers import DDIMScheduler

    sched: Any = DDIMScheduler()
    sched.set_timesteps(steps)
    kwargs = {k: v for k, v in inputs.items() if k != "noise"}
    x = inputs["noise"]  # [B, 4, H, W]
    for t in sched.timesteps:
        if on_step is not None:
            on_step(int(t))
        x_in = torch.cat([x, x])  # [2B, 4, H, W]: cond, uncond
        ts = t.to(x.device).expand(x_in.shape[0])
        out = model(x_in, timestep=ts, **kwargs).sample[:, :4].float()
        cond, uncond = out.chunk(2)
        eps = uncond + cfg * (cond - uncond)
        x = sched.step(eps, t, x.float()).prev_sample.to(x.dtype)
    return x


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], torch.Tensor], setup: Setup) -> tuple[float, float, torch.Tensor]:
    """(warm-up seconds, median loop seconds, output). Peak memory is reset after the
    warm-up loop, so it is the steady state's, not the compiler's."""
    _sync(setup.device)
    t0 = time.perf_counter()
    out = fn()
    _sync(setup.device)
    warmup = time.perf_counter() - t0
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _mark_warm()
    times = []
    for _ in range(setup.repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(setup.device)
        times.append(time.perf_counter() - t0)
    return warmup, statistics.median(times), out


def _timed(fn: Callable[[], torch.Tensor], setup: Setup) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(setup.device)
    return time.perf_counter() - t0


def _unguarded(fn: Callable[[], torch.Tensor], setup: Setup) -> float | None:
    try:
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except TypeError:  # a torch without the option
        return None
    with torch.no_grad(), stance:
        return statistics.median(_timed(fn, setup) for _ in range(setup.repeats))


_WARM: dict[str, int] = {}


def _mark_warm() -> None:
    from torch._dynamo.utils import counters

    _WARM["graphs"] = int(counters["stats"].get("unique_graphs", 0))


def step_times(fast: Any, x: torch.Tensor, kwargs: dict[str, Any], setup: Setup,
               reps: int = 5) -> tuple[float, float]:
    """Median ms of a refresh call (step 0) and a reuse call (step 1) of a transformed model."""
    t = torch.full((x.shape[0],), 500, device=x.device)
    refresh: list[float] = []
    reuse: list[float] = []
    with torch.no_grad():
        for _ in range(reps):
            api.reset(fast)
            for times in (refresh, reuse):
                _sync(setup.device)
                t0 = time.perf_counter()
                fast(x, timestep=t, **kwargs)
                _sync(setup.device)
                times.append(1e3 * (time.perf_counter() - t0))
    api.reset(fast)
    return statistics.median(refresh), statistics.median(reuse)


def kernel_profile(fast: Any, x: torch.Tensor, kwargs: dict[str, Any], setup: Setup,
                   top: int = 15) -> dict[str, Any]:
    """Which kernels one refresh step (step 0) and one reuse step (step 1) run, how many and
    for how long: torch.profiler's device kernels on CUDA (CPU ops on a CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = setup.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t = torch.full((x.shape[0],), 500, device=x.device)
    result: dict[str, Any] = {}
    with torch.no_grad():
        api.reset(fast)
        for variant in ("refresh", "reuse"):
            _sync(setup.device)
            with profile(activities=activities) as prof:
                fast(x, timestep=t, **kwargs)
                _sync(setup.device)
            events = [e for e in prof.key_averages()
                      if (e.device_type == DeviceType.CUDA) == cuda and e.count]
            timed = sorted(((e.key, e.count, (e.self_device_time_total if cuda
                                             else e.self_cpu_time_total)) for e in events),
                           key=lambda kv: -kv[2])
            result[variant] = {
                "kernels": sum(c for _, c, _ in timed),
                "device_us": sum(us for _, _, us in timed),
                "top": [[name[:80], c, round(us, 1)] for name, c, us in timed[:top]],
            }
    api.reset(fast)
    return result


def run(setup: Setup, log: Callable[[str], None] = print,
        checkpoint: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """All rows, in order. `checkpoint(rows)` runs after each row (a GPU run that hits its
    time limit still leaves what it measured)."""
    from torch._dynamo.utils import counters

    base, inputs = build(setup)
    # Each method gets its own copy on the device and frees it afterwards, so a row's peak
    # memory is one model plus what the method itself holds.
    base = base.cpu()

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base).to(setup.device)

    call0 = {k: v for k, v in inputs.items() if k != "noise"}
    x0 = torch.cat([inputs["noise"]] * 2)
    gm, _ = capture(fresh(), x0, timestep=torch.ones(x0.shape[0], device=x0.device), **call0)
    sites = [s.module_path for s in locate(gm, module_paths(base)).sites]
    torch._dynamo.reset()
    name = device_name(setup.device)
    rows: list[Row] = []
    refs: dict[int, torch.Tensor] = {}
    mode = "reduce-overhead" if setup.device == "cuda" else None

    def record(row: Row, fn: Callable[[], torch.Tensor],
               ref: torch.Tensor | None = None) -> torch.Tensor | None:
        _release(setup.device)  # earlier rows' compiled code, CUDA graph pools and models
        counters.clear()
        try:
            with torch.no_grad():
                row.warmup_s, row.loop_s, out = measure(fn, setup)
        except Exception as e:  # a peer that fails here is reported, not fatal
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            add(row)
            log(f"{row.method}: {row.note}")
            return None
        if row.method == "compiled" or row.method.startswith("fora_fx"):
            row.loop_s_unguarded = _unguarded(fn, setup)
        row.cudagraph_skips = int(counters["inductor"].get("cudagraph_skips", 0))
        row.graphs_compiled = int(counters["stats"].get("unique_graphs", 0))
        row.recompiles = row.graphs_compiled - _WARM.get("graphs", 0)
        if ref is not None:
            row.max_dev_vs_hook_fora = float((out.float() - ref.float()).abs().max())
        if setup.device == "cuda":
            row.peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
        row.device = name
        add(row)
        log(f"{row.method:<22} N={row.interval or '-'}  {row.loop_s:.4f} s  {row.note}")
        return out

    def add(row: Row) -> None:
        rows.append(row)
        _speedups(rows)
        if checkpoint is not None:
            checkpoint(rows)

    def sampler(m: Any, on_step: Callable[[int], None] | None = None,
                before: Callable[[], None] | None = None) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            if before is not None:
                before()
            return sample(m, inputs, setup.steps, on_step=on_step)
        return fn

    eager_out = record(Row("eager", None), sampler(fresh()))
    compiled = torch.compile(fresh(), fullgraph=True, dynamic=False, mode=mode)
    out = record(Row("compiled", None, note=f"mode={mode or 'default'}"), sampler(compiled))
    if out is not None and eager_out is not None:
        rows[-1].max_dev_vs_eager = float((out.float() - eager_out.float()).abs().max())
    del compiled
    for n in setup.intervals:
        hook_model = fresh()
        fora = HookFora(hook_model, sites, n)
        ref = record(Row("hook-fora (official)", n),
                     sampler(hook_model, before=fora.start_generation))
        if ref is not None:
            refs[n] = ref
    variants = [("fora_fx", n, ForaConfig(interval=n, mode=mode)) for n in setup.intervals]
    if setup.ablation and 3 in setup.intervals:  # what the batch pass + fusion limit buy
        variants.append(("fora_fx -batch -limit", 3, ForaConfig(
            interval=3, mode=mode, batch_blocks=False, reuse_fusion_limit=None)))
    for method, n, cfg in variants:
        fast = api.transform(fresh(), cfg)
        out = record(Row(method, n), sampler(fast, before=functools.partial(api.reset, fast)),
                     ref=refs.get(n))
        if out is not None:
            rows[-1].cache_mib = explain(fast).cache_bytes / 2**20
            if n > 1:
                rows[-1].refresh_ms, rows[-1].reuse_ms = step_times(fast, x0, call0, setup)
            if setup.profile and n == 3:
                rows[-1].profile = kernel_profile(fast, x0, call0, setup)
                if checkpoint is not None:
                    checkpoint(rows)
        del fast
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


def _release(device: str) -> None:
    import gc

    torch._dynamo.reset()  # also frees CUDA-graph trees' memory pools
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _speedups(rows: list[Row]) -> None:
    eager = next((r.loop_s for r in rows if r.method == "eager"), None)
    comp = next((r.loop_s for r in rows if r.method == "compiled"), None)
    for r in rows:
        if r.loop_s:
            r.speedup_vs_eager = eager / r.loop_s if eager else None
            r.speedup_vs_compiled = comp / r.loop_s if comp else None


def targets(rows: list[Row], setup: Setup) -> list[str]:
    """Issue 5's targets, checked against this run's rows: "PASS ..." / "MISS ..." lines."""
    def row(method: str, n: int | None) -> Row | None:
        return next((r for r in rows if r.method == method and r.interval == n and r.loop_s),
                    None)

    comp, n3, n6 = row("compiled", None), row("fora_fx", 3), row("fora_fx", 6)
    # The first fora_fx row compiled cold; later intervals reuse its graphs from Inductor's
    # FX-graph cache (the two variants do not depend on N), so only it says what compiling
    # costs.
    first = next((r for r in rows if r.method == "fora_fx" and r.loop_s), None)
    out: list[str] = []

    def check(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'MISS'} {text}")

    for r, goal in ((n3, 2.5), (n6, 4.0)):
        if r is not None and r.speedup_vs_compiled is not None:
            check(r.speedup_vs_compiled >= goal,
                  f"N={r.interval}: {r.speedup_vs_compiled:.2f}x over compiled (target {goal}x)")
    if n3 is not None and n3.refresh_ms and n3.reuse_ms:
        ratio = n3.reuse_ms / n3.refresh_ms
        check(ratio <= 0.15, f"reuse step {n3.reuse_ms:.2f} ms = {ratio:.1%} of a refresh step "
                             f"{n3.refresh_ms:.2f} ms (target <= 15%)")
    fora = [r for r in rows if r.method.startswith("fora_fx") and r.loop_s]
    if fora:
        skips = sum(r.cudagraph_skips or 0 for r in fora)
        recompiles = sum(r.recompiles or 0 for r in fora)
        check(skips == 0 and recompiles == 0,
              f"fora_fx rows: {skips} cudagraph skips, {recompiles} recompiles after warm-up")
    if comp is not None and first is not None and comp.warmup_s and first.warmup_s:
        ratio = first.warmup_s / comp.warmup_s
        check(ratio <= 1.6, f"warm-up {first.warmup_s:.1f} s = {ratio:.2f}x the plain "
                            f"compile's (target <= 1.6x)")
    if comp is not None and comp.max_dev_vs_eager is not None and fora:
        dev = max(r.max_dev_vs_hook_fora or 0.0 for r in fora)
        tol = 2 * comp.max_dev_vs_eager
        check(dev <= tol, f"max deviation from the eager FORA {dev:.2e} (tolerance: 2x what "
                          f"compiling alone changes, {tol:.2e})")
    if comp is not None and n3 is not None and comp.peak_mem_mib and n3.peak_mem_mib:
        bound = (comp.peak_mem_mib + (n3.cache_mib or 0)) * 1.10
        check(n3.peak_mem_mib <= bound,
              f"peak {n3.peak_mem_mib:.0f} MiB (bound: compiled {comp.peak_mem_mib:.0f} "
              f"+ cache {n3.cache_mib or 0:.0f}, +10%)")
    if setup.device != "cuda":
        out.append("(the targets are for an H100 in bf16; this run is on CPU)")
    return out


def _cache_dit_rows(setup: Setup, fresh: Callable[[], torch.nn.Module], name: str,
                    record: Callable,
                    add: Callable[[Row], None], sampler: Callable) -> None:
    """cache-dit's DBCache (F1B0, static mask every 3rd step), eager and, where it works,
    under torch.compile (cache-dit decides in Python, so expect graph breaks)."""
    from . import peers_cachedit

    if not peers_cachedit.available():
        add(Row("cache-dit", 3, device=name, note="skipped: cache_dit not installed"))
        return
    if MODELS[setup.model]["cls"] != "DiTTransformer2DModel":
        add(Row("cache-dit", 3, device=name, note="skipped: the adapter covers DiT only"))
        return
    kinds = [("cache-dit", False)] + ([("cache-dit + compile", True)]
                                      if setup.compiled_peers else [])
    for method, compiled in kinds:
        try:
            peer = peers_cachedit.CacheDitPeer(fresh(), 3, setup.steps)
            fn: Any = peer
            if compiled:
                import cache_dit

                cache_dit.set_compile_configs()
                fn = torch.compile(peer.model, dynamic=False)
        except Exception as e:
            add(Row(method, 3, device=name, note=f"skipped: {type(e).__name__}: {e}"[:160]))
            continue
        record(Row(method, 3, note="DBCache F1B0, static mask"),
               sampler(fn, before=peer.start_generation))


def markdown(rows: list[Row], setup: Setup) -> str:
    head = (f"`fora-fx bench` — {setup.model}, {setup.batch} image(s) + {setup.batch} uncond "
            f"(B={2 * setup.batch}), {setup.steps} DDIM steps, {setup.dtype}, "
            f"torch {torch.__version__}\n\n")
    cols = ["method", "N", "loop s", "× eager", "× compiled", "unguarded s", "warm-up s",
            "cg skips",
            "graphs", "recompiles", "peak MiB", "cache MiB", "max dev", "refresh ms",
            "reuse ms", "device", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v: Any, spec: str = ".3f") -> str:
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    for r in rows:
        lines.append("| " + " | ".join([
            r.method, f(r.interval), f(r.loop_s, ".4f"), f(r.speedup_vs_eager, ".2f"),
            f(r.speedup_vs_compiled, ".2f"), f(r.loop_s_unguarded, ".4f"),
            f(r.warmup_s, ".1f"), f(r.cudagraph_skips),
            f(r.graphs_compiled), f(r.recompiles), f(r.peak_mem_mib, ".0f"), f(r.cache_mib, ".1f"),
            f(r.max_dev_vs_hook_fora if r.max_dev_vs_eager is None else r.max_dev_vs_eager,
              ".2e"), f(r.refresh_ms, ".2f"), f(r.reuse_ms, ".2f"),
            r.device, r.note]) + " |")
    text = head + "\n".join(lines) + "\n\n" + "\n".join(f"- {t}" for t in targets(rows, setup))
    for r in rows:
        for variant, p in (r.profile or {}).items():
            what = "kernels" if setup.device == "cuda" else "CPU ops"
            text += (f"\n\n{r.method} N={r.interval}, one {variant} step: {p['kernels']} "
                     f"{what}, {p['device_us'] / 1e3:.2f} ms\n\n"
                     f"| {what[:-1]} | calls | us |\n|---|---|---|\n")
            text += "\n".join(f"| `{name}` | {c} | {us} |" for name, c, us in p["top"])
    return text


def write_json(rows: list[Row], setup: Setup, path: str) -> None:
    payload = {"setup": {**asdict(setup), "dtype": str(setup.dtype),
                         "torch": torch.__version__}, "rows": [asdict(r) for r in rows]}
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
