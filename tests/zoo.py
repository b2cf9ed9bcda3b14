"""Tiny random-weight diffusion transformers used as FORA test subjects.

Every case is a 2-block (or 1 double + 1 single block for Flux and HunyuanVideo) model with a
hidden size of 16-32 and an 8x8 latent, so one forward pass takes a few
milliseconds on CPU.  Weights are random but deterministic (each builder
seeds torch), and any parameter that a library initialises to all zeros is
re-randomised so that every cached site influences the output.

``Case.sites`` lists, in graph order, the module paths whose raw outputs FORA
caches: the attention / feed-forward modules whose output is taken *after* the
output projection and *before* the adaLN gate multiply and the residual add.
None of the listed diffusers modules adds a residual internally (diffusers
``Attention(residual_connection=False)``, the default for all of them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
SAMPLE = 8  # latent height / width
LATENT_CH = 4
NUM_CLASSES = 10
TEXT_LEN = 6


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: Callable[[int, int], tuple[tuple, dict]]
    sites: list[str]  # modules whose outputs the eager reference caches
    # what fora_fx.explain lists, where it differs from `sites` (a parallel block is one site
    # named by its block; the reference caches its output projection, the same value)
    fora_sites: list[str] | None = None

    @property
    def explained(self) -> list[str]:
        return self.fora_sites if self.fora_sites is not None else self.sites


# --------------------------------------------------------------------------- helpers


def timestep_value(step: int) -> float:
    """Timestep for denoising step ``step``: 999, 962, 925, ... (kept in [0, 1000))."""
    return float((999 - 37 * step) % 1000)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def _timesteps(step: int, batch: int, scale: float = 1.0) -> torch.Tensor:
    return torch.full((batch,), timestep_value(step) * scale, dtype=torch.float32)


def _rerandomize_zeros(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Give every all-zero parameter small random values (zero-init gates, biases, ...)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 0 and not bool(p.ne(0).any()):
                p.normal_(0.0, std)
    return model


def _finish(model: nn.Module) -> nn.Module:
    _rerandomize_zeros(model)
    return model.float().eval()


def run_steps(model, case: Case, steps: int, seed: int) -> list[torch.Tensor]:
    """The main output of `steps` calls of `model` on the case's inputs for steps 0, 1, ..."""
    outs = []
    for k in range(steps):
        args, kwargs = case.inputs(k, seed)
        with torch.no_grad():
            outs.append(output_tensor(model(*args, **kwargs)))
    return outs


def output_tensor(out) -> torch.Tensor:
    """The main tensor of a model output (``.sample``, ``tuple[0]`` or the tensor itself)."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)):
        return output_tensor(out[0])
    if isinstance(out, dict):
        return output_tensor(next(iter(out.values())))
    raise TypeError(f"cannot extract a tensor from {type(out).__name__}")


# --------------------------------------------------------------------------- diffusers

# Video DiTs and the Sana family live in their own modules; their builders import this
# one's helpers when called.
from zoo_image import build_auraflow, build_flux2  # noqa: E402
from zoo_sana import build_sana, build_sana_video  # noqa: E402
from zoo_video import (  # noqa: E402
    build_cogvideox,
    build_hunyuan_video,
    build_ltx,
    build_mochi,
    build_wan,
)


def build_dit(batch: int = BATCH) -> Case:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CH,
        out_channels=LATENT_CH,
        num_layers=2,
        sample_size=SAMPLE,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )
    model = _finish(model)

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        x = _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        return (), {"hidden_states": x, "timestep": _timesteps(step, batch), "class_labels": y}

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]
    return Case("dit", model, inputs, sites)


def build_pixart(batch: int = BATCH) -> Case:
    from diffusers import PixArtTransformer2DModel

    caption_channels = 24
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CH,
        out_channels=LATENT_CH,
        num_layers=2,
        cross_attention_dim=32,
        sample_size=SAMPLE,
        patch_size=2,
        use_additional_conditions=False,
        caption_channels=caption_channels,
    )
    model = _finish(model)

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        x = _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE)
        ctx = _randn(g, batch, TEXT_LEN, caption_channels)
        return (), {
            "hidden_states": x,
            "encoder_hidden_states": ctx,
            "timestep": _timesteps(step, batch),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }

    sites = [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "attn2", "ff")]
    return Case("pixart", model, inputs, sites)


def build_sd3(batch: int = BATCH) -> Case:
    from diffusers import SD3Transformer2DModel

    joint_dim, pooled_dim = 24, 20
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=SAMPLE,
        patch_size=2,
        in_channels=LATENT_CH,
        out_channels=LATENT_CH,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        caption_projection_dim=32,  # must equal the inner dim (heads * head_dim)
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=SAMPLE,
        dual_attention_layers=(),
    )
    model = _finish(model)

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        x = _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE)
        ctx = _randn(g, batch, TEXT_LEN, joint_dim)
        pooled = _randn(g, batch, pooled_dim)
        return (), {
            "hidden_states": x,
            "encoder_hidden_states": ctx,
            "pooled_projections": pooled,
            "timestep": _timesteps(step, batch),
        }

    # Block 0: attn -> (img, ctx) pair, ff, ff_context.  Block 1 is the last block and
    # is context_pre_only: no ff_context / to_add_out, its attn still returns a pair
    # whose context half is unused.
    sites: list[str] = []
    for i, block in enumerate(model.transformer_blocks):
        sites += [f"transformer_blocks.{i}.attn", f"transformer_blocks.{i}.ff"]
        if block.ff_context is not None:
            sites.append(f"transformer_blocks.{i}.ff_context")
    return Case("sd3", model, inputs, sites)


def build_flux(batch: int = BATCH) -> Case:
    from diffusers import FluxTransformer2DModel

    in_ch, joint_dim, pooled_dim = 16, 24, 20  # in_ch = 4 latent channels x 2x2 packing
    side = SAMPLE // 2
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_ch,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    model = _finish(model)

    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    img_ids = img_ids.reshape(side * side, 3)
    txt_ids = torch.zeros(TEXT_LEN, 3)

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        x = _randn(g, batch, side * side, in_ch)
        ctx = _randn(g, batch, TEXT_LEN, joint_dim)
        pooled = _randn(g, batch, pooled_dim)
        return (), {
            "hidden_states": x,
            "encoder_hidden_states": ctx,
            "pooled_projections": pooled,
            "timestep": _timesteps(step, batch, scale=1e-3),  # Flux multiplies by 1000
            "img_ids": img_ids.clone(),
            "txt_ids": txt_ids.clone(),
        }

    sites = [
        "transformer_blocks.0.attn",  # returns (img_out, ctx_out)
        "transformer_blocks.0.ff",
        "transformer_blocks.0.ff_context",
        # parallel block: attn (pre_only) and proj_mlp -> act_mlp are concatenated into
        # proj_out, whose output (before the gate) is the cache point
        "single_transformer_blocks.0.proj_out",
    ]
    fora_sites = sites[:3] + ["single_transformer_blocks.0"]
    return Case("flux", model, inputs, sites, fora_sites)


# --------------------------------------------------------------------------- timm-style DiT


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


class Attention(nn.Module):
    """timm ``Attention``: fused qkv -> SDPA -> proj."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class CrossAttention(nn.Module):
    """q from x, k/v from a context sequence, SDPA, proj."""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        L = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(context).reshape(B, L, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """timm ``Mlp``: fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.drop1 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 32):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.freq_dim))


class DiTBlock(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        if context_dim is not None:
            self.norm_x = nn.LayerNorm(dim, eps=1e-6)
            self.cross_attn = CrossAttention(dim, context_dim, num_heads)
        else:
            self.norm_x = None
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, context=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_x(x), context)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimmDiT(nn.Module):
    """Class-conditional DiT in the style of facebookresearch/DiT (timm building blocks)."""

    def __init__(
        self,
        input_size: int = SAMPLE,
        patch_size: int = 2,
        in_channels: int = LATENT_CH,
        hidden_size: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        num_classes: int = NUM_CLASSES,
        context_dim: int | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches, hidden_size) * 0.02)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # +1: CFG null class
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, context_dim, mlp_ratio) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # adaLN-Zero would zero these; use small random values so gates are non-zero.
        for m in self.modules():
            if (
                isinstance(m, nn.Sequential)
                and isinstance(m[-1], nn.Linear)
                and (m[-1].out_features in (2 * hidden_size, 6 * hidden_size))
            ):
                nn.init.normal_(m[-1].weight, std=0.1)
                nn.init.normal_(m[-1].bias, std=0.1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, context=None):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c, context)
        x = self.final_layer(x, c)
        return self.unpatchify(x)


def build_timm(batch: int = BATCH) -> Case:
    torch.manual_seed(0)
    model = _finish(TimmDiT())

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        x = _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        return (x, _timesteps(step, batch), y), {}

    sites = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn", "mlp")]
    return Case("timm", model, inputs, sites)


def build_timm_xattn(batch: int = BATCH) -> Case:
    context_dim = 24
    torch.manual_seed(0)
    model = _finish(TimmDiT(context_dim=context_dim))

    def inputs(step: int, seed: int) -> tuple[tuple, dict]:
        g = _gen(seed)
        x = _randn(g, batch, LATENT_CH, SAMPLE, SAMPLE)
        y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
        ctx = _randn(g, batch, TEXT_LEN, context_dim)
        return (x, _timesteps(step, batch), y, ctx), {}

    sites = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn", "cross_attn", "mlp")]
    return Case("timm_xattn", model, inputs, sites)


CASES: dict[str, Callable[[], Case]] = {
    "dit": build_dit,
    "pixart": build_pixart,
    "sd3": build_sd3,
    "flux": build_flux,
    "timm": build_timm,
    "timm_xattn": build_timm_xattn,
    "wan": build_wan,
    "cogvideox": build_cogvideox,
    "ltx": build_ltx,
    "hunyuan_video": build_hunyuan_video,
    "mochi": build_mochi,
    "sana": build_sana,
    "sana_video": build_sana_video,
    "flux2": build_flux2,
    "auraflow": build_auraflow,
}


def make(name: str, batch: int = BATCH) -> Case:
    try:
        builder = CASES[name]
    except KeyError:
        raise KeyError(f"unknown zoo case {name!r}; choose from {sorted(CASES)}") from None
    return builder(batch=batch)
