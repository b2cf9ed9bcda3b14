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
    graphs_compiled: int | None = None
    peak_mem_mib: float | None = None
    cache_mib: float | None = None
    max_dev_vs_hook_fora: float | None = None
    refresh_ms: float | None = None  # one transformer call that recomputes (fora_fx rows)
    reuse_ms: float | None = None  # one that reuses: FORA's per-step floor
    device: str = ""
    note: str = ""


@dataclass
class Setup:
    model: str = "dit-xl-2"
    batch: int = 2
    steps: int = 50
    repeats: int = 3
    intervals: tuple[int, ...] = (2, 3, 4, 6)
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
    """(warm-up seconds, median loop seconds, output)."""
    _sync(setup.device)
    t0 = time.perf_counter()
    out = fn()
    _sync(setup.device)
    warmup = time.perf_counter() - t0
    times = []
    for _ in range(setup.repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(setup.device)
        times.append(time.perf_counter() - t0)
    return warmup, statistics.median(times), out


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


def run(setup: Setup, log: Callable[[str], None] = print) -> list[Row]:
    from torch._dynamo.utils import counters

    base, inputs = build(setup)
    call0 = {k: v for k, v in inputs.items() if k != "noise"}
    x0 = torch.cat([inputs["noise"]] * 2)
    gm, _ = capture(base, x0, timestep=torch.ones(x0.shape[0], device=x0.device), **call0)
    sites = [s.module_path for s in locate(gm, module_paths(base)).sites]
    torch._dynamo.reset()
    name = device_name(setup.device)
    rows: list[Row] = []
    refs: dict[int, torch.Tensor] = {}
    mode = "reduce-overhead" if setup.device == "cuda" else None

    def record(row: Row, fn: Callable[[], torch.Tensor],
               ref: torch.Tensor | None = None) -> torch.Tensor | None:
        counters.clear()
        if setup.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            with torch.no_grad():
                row.warmup_s, row.loop_s, out = measure(fn, setup)
        except Exception as e:  # a peer that fails here is reported, not fatal
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            log(f"{row.method}: {row.note}")
            return None
        row.cudagraph_skips = int(counters["inductor"].get("cudagraph_skips", 0))
        row.graphs_compiled = int(counters["stats"].get("unique_graphs", 0))
        if setup.device == "cuda":
            row.peak_mem_mib = torch.cuda.max_memory_allocated() / 2**20
        if ref is not None:
            row.max_dev_vs_hook_fora = float((out.float() - ref.float()).abs().max())
        row.device = name
        rows.append(row)
        log(f"{row.method:<22} N={row.interval or '-'}  {row.loop_s:.4f} s  {row.note}")
        return out

    def sampler(m: Any, on_step: Callable[[int], None] | None = None,
                before: Callable[[], None] | None = None) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            if before is not None:
                before()
            return sample(m, inputs, setup.steps, on_step=on_step)
        return fn

    record(Row("eager", None), sampler(copy.deepcopy(base)))
    compiled = torch.compile(copy.deepcopy(base), fullgraph=True, dynamic=False, mode=mode)
    record(Row("compiled", None, note=f"mode={mode or 'default'}"), sampler(compiled))
    for n in setup.intervals:
        hook_model = copy.deepcopy(base)
        fora = HookFora(hook_model, sites, n)
        ref = record(Row("hook-fora (official)", n),
                     sampler(hook_model, before=fora.start_generation))
        if ref is not None:
            refs[n] = ref
    for n in setup.intervals:
        cfg = ForaConfig(interval=n, mode=mode)
        fast = api.transform(copy.deepcopy(base), cfg)
        out = record(Row("fora_fx", n), sampler(fast, before=functools.partial(api.reset, fast)),
                     ref=refs.get(n))
        if out is not None:
            rows[-1].cache_mib = explain(fast).cache_bytes / 2**20
            if n > 1:
                rows[-1].refresh_ms, rows[-1].reuse_ms = step_times(fast, x0, call0, setup)
    for kind in ("taylorseer", "pab"):
        n = 3
        current = {"t": 999}  # PAB reads the step's timestep through a callback
        m = copy.deepcopy(base)
        try:
            hook = DiffusersHook(m, kind, n, timestep=functools.partial(current.__getitem__, "t"),
                                 site_paths=sites)
        except Exception as e:
            rows.append(Row(f"diffusers {kind}", n, device=name,
                            note=f"skipped: {type(e).__name__}: {e}"[:160]))
            continue
        record(Row(f"diffusers {kind}", n), sampler(
            hook, on_step=functools.partial(current.__setitem__, "t"),
            before=hook.start_generation))
    try:
        import cache_dit  # noqa: F401
        rows.append(Row("cache-dit", 3, device=name, note="installed; adapter not written yet"))
    except ImportError:
        rows.append(Row("cache-dit", 3, device=name, note="skipped: cache_dit not installed"))

    eager = next((r.loop_s for r in rows if r.method == "eager"), None)
    comp = next((r.loop_s for r in rows if r.method == "compiled"), None)
    for r in rows:
        if r.loop_s:
            r.speedup_vs_eager = eager / r.loop_s if eager else None
            r.speedup_vs_compiled = comp / r.loop_s if comp else None
    return rows


def markdown(rows: list[Row], setup: Setup) -> str:
    head = (f"`fora-fx bench` — {setup.model}, batch {setup.batch} (+{setup.batch} uncond), "
            f"{setup.steps} DDIM steps, {setup.dtype}, torch {torch.__version__}\n\n")
    cols = ["method", "N", "loop s", "× eager", "× compiled", "warm-up s", "cg skips",
            "graphs", "peak MiB", "cache MiB", "max dev", "refresh ms", "reuse ms", "device",
            "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v: Any, spec: str = ".3f") -> str:
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    for r in rows:
        lines.append("| " + " | ".join([
            r.method, f(r.interval), f(r.loop_s, ".4f"), f(r.speedup_vs_eager, ".2f"),
            f(r.speedup_vs_compiled, ".2f"), f(r.warmup_s, ".1f"), f(r.cudagraph_skips),
            f(r.graphs_compiled), f(r.peak_mem_mib, ".0f"), f(r.cache_mib, ".1f"),
            f(r.max_dev_vs_hook_fora, ".2e"), f(r.refresh_ms, ".2f"), f(r.reuse_ms, ".2f"),
            r.device, r.note]) + " |")
    return head + "\n".join(lines)


def write_json(rows: list[Row], setup: Setup, path: str) -> None:
    payload = {"setup": {**asdict(setup), "dtype": str(setup.dtype),
                         "torch": torch.__version__}, "rows": [asdict(r) for r in rows]}
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
