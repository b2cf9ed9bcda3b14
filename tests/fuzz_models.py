"""Random DiTs written the way real ones are: tables built at run time.

A `Recipe` picks, besides the usual sizes, what real models do and the first release's
random models never did (each one broke or would have broken fora_fx's default path):

  * `pos`: the position table is a parameter, a sin/cos table rebuilt from
    `torch.arange` / `torch.meshgrid` on every call, or one kept as a buffer for the
    training size and rebuilt only when the latent size differs (diffusers' DiT, PixArt);
  * `pos_inplace`: the frequencies are divided in place (`omega /= d`, as diffusers'
    `get_1d_sincos_pos_embed_from_grid` does) or functionally;
  * `rope`: rotary embeddings computed inside attention (in place or not), or once per
    call outside the blocks and passed in, or none;
  * `block_table`: every block builds the same small scale table with `torch.linspace`
    (written in place or not) before its attention: identical nodes in every block and
    outside any cache site, the batch pass's food;
  * `sizes`: the latent size of each generation (a resolution change between them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from zoo import FinalLayer, Mlp, PatchEmbed, TimestepEmbedder, modulate

POS = ("param", "sincos_call", "sincos_cached")
ROPE = ("none", "attn_inplace", "attn", "model")
TABLE = ("none", "inplace", "functional")


@dataclass(frozen=True)
class Recipe:
    depth: int
    heads: int
    head_dim: int
    mlp_ratio: float
    pos: str
    pos_inplace: bool
    rope: str
    block_table: str
    sizes: tuple[int, ...]
    interval: int
    seed: int

    def features(self) -> list[str]:
        out = [f"pos={self.pos}", f"rope={self.rope}", f"block_table={self.block_table}"]
        if self.pos != "param":
            out.append(f"pos_inplace={self.pos_inplace}")
        if len(set(self.sizes)) > 1:
            out.append("resolution_change")
        return out


@st.composite
def recipes(draw: st.DrawFn, min_depth: int = 1, max_depth: int = 3,
            resize: bool = False) -> Recipe:
    """`resize`: every model whose table allows it changes resolution between generations."""
    pos = draw(st.sampled_from(POS))
    # a learned table has one size; a built one may change between generations
    choices = [(4, 8), (8, 4)] + ([] if resize else [(4, 4)])
    sizes = (4, 4) if pos == "param" else draw(st.sampled_from(choices))
    return Recipe(
        depth=draw(st.integers(min_depth, max_depth)),
        heads=draw(st.sampled_from([1, 2])),
        head_dim=draw(st.sampled_from([4, 8])),
        mlp_ratio=draw(st.sampled_from([1.0, 2.0])),
        pos=pos,
        pos_inplace=draw(st.booleans()),
        rope=draw(st.sampled_from(ROPE)),
        block_table=draw(st.sampled_from(TABLE)),
        sizes=sizes,
        interval=draw(st.integers(2, 4)),
        seed=draw(st.integers(0, 2**16)),
    )


def _frequencies(n: int, dim: int, inplace: bool) -> torch.Tensor:
    omega = torch.arange(n, dtype=torch.float32)
    if inplace:
        omega /= dim
        omega = 1.0 / 10000**omega
    else:
        omega = 1.0 / 10000 ** (omega / dim)
    return omega


def sincos_2d(dim: int, h: int, w: int, inplace: bool) -> torch.Tensor:
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = _frequencies(dim // 4, dim // 4, inplace)
    ay, ax = gy.reshape(-1)[:, None] * omega[None], gx.reshape(-1)[:, None] * omega[None]
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)[None]


def rotary(n: int, head_dim: int, inplace: bool) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = torch.outer(torch.arange(n, dtype=torch.float32),
                        _frequencies(head_dim // 2, head_dim // 2, inplace))
    return freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    return x * cos + rot * sin


class FuzzAttention(nn.Module):
    def __init__(self, dim: int, heads: int, rope: str):
        super().__init__()
        self.heads, self.head_dim, self.rope = heads, dim // heads, rope
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        if self.rope in ("attn", "attn_inplace"):  # built here, every call (Lumina, Wan 2.x)
            rope = rotary(N, self.head_dim, self.rope == "attn_inplace")
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class FuzzBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, recipe: Recipe):
        super().__init__()
        self.table = recipe.block_table
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = FuzzAttention(dim, heads, recipe.rope)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope=None):
        mod = self.adaLN_modulation(c).chunk(6, dim=1)
        if self.table != "none":  # the same table in every block, outside the sites
            scale = torch.linspace(0.9, 1.1, x.shape[-1])
            if self.table == "inplace":
                scale.mul_(1.5)
            else:
                scale = scale * 1.5
            x = x * scale
        h = modulate(self.norm1(x), mod[0], mod[1])
        x = x + mod[2].unsqueeze(1) * self.attn(h, rope)
        h = modulate(self.norm2(x), mod[3], mod[4])
        return x + mod[5].unsqueeze(1) * self.mlp(h)


class FuzzDiT(nn.Module):
    patch = 2

    def __init__(self, recipe: Recipe, in_channels: int = 4, num_classes: int = 10):
        super().__init__()
        torch.manual_seed(recipe.seed)
        dim = recipe.heads * recipe.head_dim * 2  # sin/cos tables need dim % 4 == 0
        self.recipe, self.dim, self.out_channels = recipe, dim, in_channels
        self.x_embedder = PatchEmbed(self.patch, in_channels, dim)
        grid = 4 // self.patch  # the "training" latent size is 4
        if recipe.pos == "param":
            self.pos_embed = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        elif recipe.pos == "sincos_cached":
            self.register_buffer("pos_embed", sincos_2d(dim, grid, grid, recipe.pos_inplace))
        self.grid = grid
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList(
            FuzzBlock(dim, recipe.heads * 2, recipe.mlp_ratio, recipe)
            for _ in range(recipe.depth)
        )
        self.final_layer = FinalLayer(dim, self.patch, in_channels)
        with torch.no_grad():  # adaLN-Zero would zero the gates: make every site count
            for m in self.modules():
                if isinstance(m, nn.Linear) and m.out_features in (2 * dim, 6 * dim):
                    m.weight.normal_(0, 0.1)
                    m.bias.normal_(0, 0.1)

    def forward(self, x, t, y):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.x_embedder(x)
        if self.recipe.pos == "sincos_call":
            x = x + sincos_2d(self.dim, h, w, self.recipe.pos_inplace)
        elif self.recipe.pos == "sincos_cached" and (h, w) != (self.grid, self.grid):
            x = x + sincos_2d(self.dim, h, w, self.recipe.pos_inplace)
        else:
            x = x + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        rope = None
        if self.recipe.rope == "model":  # once per call, passed to every block (Flux)
            rope = rotary(h * w, self.dim // (self.recipe.heads * 2), inplace=True)
        for block in self.blocks:
            x = block(x, c, rope)
        x = self.final_layer(x, c)
        return self._unpatchify(x, h, w)

    def _unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        c, p = self.out_channels, self.patch
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def site_paths(self) -> list[str]:
        return [f"blocks.{i}.{s}" for i in range(len(self.blocks)) for s in ("attn", "mlp")]


def inputs(step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return (torch.randn(2, 4, size, size, generator=g), torch.full((2,), 950.0 - 80 * step),
            torch.tensor([1, 7]))
