"""What `fora-fx bench` measures on: model configs, the row and setup records, the model and
its sampler inputs, and the DDIM loop every method runs."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Shapes shared by the DiT and PixArt configs of one size (XL/2: hidden 16 x 72 = 1152).
_XL2 = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
            out_channels=8, patch_size=2)
_TINY = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4,
             out_channels=8, patch_size=2, sample_size=8)
_DIT = dict(cls="DiTTransformer2DModel", num_embeds_ada_norm=1000)
_PIXART = dict(cls="PixArtTransformer2DModel", use_additional_conditions=False)

MODELS: dict[str, dict[str, Any]] = {
    # diffusers DiT-XL/2 at 256x256 (32x32 latents), the config DiT-XL-2-256 ships
    "dit-xl-2": dict(**_DIT, **_XL2, sample_size=32),
    # PixArt-alpha XL/2 at 512x512 (64x64 latents), with cross-attention to T5 tokens
    "pixart-512": dict(**_PIXART, **_XL2, sample_size=64, cross_attention_dim=1152,
                       caption_channels=4096),
    "tiny": dict(**_DIT, **_TINY),
    # the PixArt path of the harness (caption tokens, cross-attention), CPU-sized
    "tiny-pixart": dict(**_PIXART, **_TINY, cross_attention_dim=32, caption_channels=24),
    # Wan 2.1 T2V 1.3B (30 blocks, hidden 1536, FFN 8960, UMT5 text width 4096): 17 frames at
    # 320 x 512 (latents 16 x 5 x 40 x 64, 3,200 video tokens), 128 prompt tokens
    "wan-1.3b": dict(cls="WanTransformer3DModel", num_layers=30, num_attention_heads=12,
                     attention_head_dim=128, ffn_dim=8960, in_channels=16, out_channels=16,
                     text_dim=4096, latent=(16, 5, 40, 64), text_tokens=128),
    # its structure (rotary self-attention, cross-attention, FFN) at CPU size
    "small-wan": dict(cls="WanTransformer3DModel", num_layers=6, num_attention_heads=4,
                      attention_head_dim=32, ffn_dim=512, in_channels=4, out_channels=4,
                      text_dim=64, freq_dim=64, latent=(4, 3, 16, 16), text_tokens=16),
    "tiny-wan": dict(cls="WanTransformer3DModel", num_layers=2, num_attention_heads=2,
                     attention_head_dim=16, ffn_dim=64, in_channels=4, out_channels=4,
                     text_dim=24, freq_dim=32, latent=(4, 3, 8, 8), text_tokens=6),
    # Lumina 2's structure at CPU size: its forward breaks Dynamo's graph (caption lengths
    # via `.tolist()`), so every compiled row runs piecewise (fullgraph=False); 256 image
    # tokens, 16 caption tokens (the last one padding)
    "small-lumina2": dict(cls="Lumina2Transformer2DModel", sample_size=32, patch_size=2,
                          in_channels=4, hidden_size=128, num_layers=6, num_refiner_layers=2,
                          num_attention_heads=4, num_kv_heads=2, multiple_of=64,
                          axes_dim_rope=(8, 12, 12), axes_lens=(64, 32, 32), cap_feat_dim=64,
                          text_tokens=16, piecewise=True),
    "tiny-lumina2": dict(cls="Lumina2Transformer2DModel", sample_size=8, patch_size=2,
                         in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
                         num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                         axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32), cap_feat_dim=24,
                         text_tokens=6, piecewise=True),
}
# Keys of a MODELS entry that describe the sampler's inputs or the run, not the model's config.
_INPUT_KEYS = ("latent", "text_tokens", "piecewise")


def piecewise(model: str) -> bool:
    """Whether the model's own code breaks Dynamo's graph: compiled rows use fullgraph=False."""
    return bool(MODELS[model].get("piecewise"))


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
    # fora_fx rows: the share of calls that skipped Dynamo's frame (fora_fx/direct.py): all
    # but each generation's first if it works on this torch, 0 if it declined
    direct_share: float | None = None
    # --profile: per step variant, {"kernels": n, "device_us": t, "top": [[name, n, us], ...]}
    profile: dict[str, Any] | None = None
    # the range of the per-round speedups over eager (speedup_vs_eager is their median)
    speedup_vs_eager_lo: float | None = None
    speedup_vs_eager_hi: float | None = None
    # this row's rounds against the eager model: bench.timing.Timings.to_json()
    timing: dict[str, Any] | None = None
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
    forecast: bool = True  # also fora_fx with forecast="taylor", order 2, at each interval
    profile: bool = False  # kernel-level profile of one refresh and one reuse step (N=3 rows)
    compiled_peers: bool = True  # also try cache-dit under torch.compile
    peers: bool = True  # the hook FORA, diffusers' hooks and cache-dit rows
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
    shapes = {k: spec.pop(k) for k in _INPUT_KEYS if k in spec}
    torch.manual_seed(0)
    model = getattr(diffusers, spec.pop("cls"))(**spec).eval()
    with torch.no_grad():  # adaLN-Zero initialises gates to zero: make every block count
        for p in model.parameters():
            if not bool(p.ne(0).any()):
                p.normal_(0, 0.02)
    model = model.to(setup.device, setup.dtype)
    n = 2 * setup.batch
    g = torch.Generator().manual_seed(1)
    extra: dict[str, Any] = {}
    if "latent" in shapes:  # video: [C, frames, H, W] latents, a text encoder's tokens
        emb = torch.randn(n, shapes["text_tokens"], spec["text_dim"], generator=g)
        noise = torch.randn(setup.batch, *shapes["latent"], generator=g)
        return model, dict(noise=noise.to(setup.device, setup.dtype),
                           encoder_hidden_states=emb.to(setup.device, setup.dtype))
    side = spec["sample_size"]
    if "cap_feat_dim" in spec:  # Lumina 2: caption features and their padding mask
        emb = torch.randn(n, shapes["text_tokens"], spec["cap_feat_dim"], generator=g)
        mask = torch.ones(n, shapes["text_tokens"], dtype=torch.long, device=setup.device)
        mask[:, -1] = 0
        extra = dict(encoder_hidden_states=emb.to(setup.device, setup.dtype),
                     encoder_attention_mask=mask)
    elif "caption_channels" in spec:
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
    """DDIM (eta 0) with batched classifier-free guidance; host-side control only. (Wan's own
    pipeline runs cond and uncond as two calls and samples by flow matching; the transformer's
    work per step is the same.)

    The timesteps go to the device once, before the loop: `t.to(device)` inside it would copy
    from pageable host memory, which synchronizes the stream, every step. With a caching step
    a fraction of a millisecond long, that sync would put the host's per-step work (the
    sampler's eager ops, the model call's dispatch) in series with the device's, for every
    row alike; without it the host runs ahead during the long refresh steps."""
    from diffusers import DDIMScheduler

    sched: Any = DDIMScheduler()
    sched.set_timesteps(steps)
    kwargs = {k: v for k, v in inputs.items() if k != "noise"}
    x = inputs["noise"]  # [B, C, H, W], or [B, C, frames, H, W] for a video model
    channels = x.shape[1]  # DiT's output also has C learned-variance channels: dropped
    on_device = sched.timesteps.to(x.device)
    for i, t in enumerate(sched.timesteps):
        if on_step is not None:
            on_step(int(t))
        x_in = torch.cat([x, x])  # [2B, ...]: cond, uncond
        ts = on_device[i].expand(x_in.shape[0])
        out = model(x_in, timestep=ts, **kwargs).sample[:, :channels].float()
        cond, uncond = out.chunk(2)
        eps = uncond + cfg * (cond - uncond)
        x = sched.step(eps, t, x.float()).prev_sample.to(x.dtype)
    return x


