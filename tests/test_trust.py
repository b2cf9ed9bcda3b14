"""Never silently wrong: run-time tables, tables written inside attention, a diffusers DiT
at a latent size other than its `sample_size`. Each of these gave wrong outputs at
`interval=1` (or lost every attention site) before memory and writes were read from the
traced values and the ops' schemas (passes/effects.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import EagerFora
from zoo import Attention, TimmDiT

import fora_fx


def _inputs(k: int, size: int = 8):
    g = torch.Generator().manual_seed(k)
    return (torch.randn(2, 4, size, size, generator=g), torch.full((2,), 900.0 - 90 * k),
            torch.tensor([1, 3]))


def _run(model, steps: int = 4, size: int = 8):
    with torch.no_grad():
        return [model(*_inputs(k, size)) for k in range(steps)]


class TablesDiT(TimmDiT):
    """Builds two equal tables per call and writes them in place (the issue's repro)."""

    def forward(self, x, t, y, context=None):
        a = torch.arange(4.0)
        a /= 2
        b = torch.arange(4.0)
        b /= 2
        return super().forward(x, t, y) + (a + b).sum()


class RotaryAttention(Attention):
    """Rotary frequencies computed per call and divided in place inside the attention."""

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        inv = torch.arange(0, self.head_dim, 2, dtype=torch.float32)
        inv /= self.head_dim
        inv = 1.0 / (10000.0 ** inv)
        freqs = torch.outer(torch.arange(N, dtype=torch.float32), inv)
        cos, sin = freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)
        rot = torch.stack((-q[..., 1::2], q[..., 0::2]), -1).flatten(-2)
        q = q * cos + rot * sin
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(o)


def _rotary_dit() -> TimmDiT:
    torch.manual_seed(0)
    model = TimmDiT(depth=3)
    for block in model.blocks:
        attn = RotaryAttention(32, 2)
        attn.load_state_dict(block.attn.state_dict())
        block.attn = attn
    return model.eval()


@pytest.mark.parametrize("batch_blocks", [True, False])
def test_run_time_tables_written_in_place_are_not_merged(batch_blocks):
    torch.manual_seed(0)
    model = TablesDiT().eval()
    expected = _run(model)
    fast = fora_fx.transform(model, interval=1, compiler="eager", batch_blocks=batch_blocks)
    for got, want in zip(_run(fast), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_blocks", [True, False])
def test_rotary_table_written_inside_attention_is_cached_and_exact(batch_blocks):
    model = _rotary_dit()
    expected = _run(model)
    fast = fora_fx.transform(model, interval=1, compiler="eager", batch_blocks=batch_blocks)
    paths = [f"blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp")]
    for got, want in zip(_run(fast), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = fora_fx.explain(fast)
    assert [s.module_path for s in report.sites] == paths, report
    fora_fx.restore(fast)
    ref = EagerFora(model, paths, interval=3)
    expected = _run(ref, 5)
    ref.remove()
    fast = fora_fx.transform(model, interval=3, compiler="eager", batch_blocks=batch_blocks)
    for got, want in zip(_run(fast, 5), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _diffusers_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=8, sample_size=8, num_embeds_ada_norm=1000,
    ).eval()


def test_diffusers_dit_at_a_latent_size_other_than_sample_size():
    """Its sin/cos position table is rebuilt per call from torch.arange when the latent is
    not `sample_size` (16x16 here against 8): off by 1.7-1.9 at interval=1 before."""
    model = _diffusers_dit()

    def call(m, k):
        x, t, y = _inputs(k, 16)
        with torch.no_grad():
            return m(x, timestep=t, class_labels=y).sample

    expected = [call(model, k) for k in range(5)]
    fast = fora_fx.transform(model, interval=1)  # the default path: Inductor, batched blocks
    for k, want in enumerate(expected):
        torch.testing.assert_close(call(fast, k), want, rtol=1e-4, atol=1e-4)
    fora_fx.restore(fast)
    paths = [f"transformer_blocks.{i}.{s}" for i in range(2) for s in ("attn1", "ff")]
    ref = EagerFora(model, paths, interval=3)
    expected = [call(ref, k) for k in range(5)]
    ref.remove()
    fast = fora_fx.transform(model, interval=3)
    for k, want in enumerate(expected):
        torch.testing.assert_close(call(fast, k), want, rtol=1e-4, atol=1e-4)
    assert [s.module_path for s in fora_fx.explain(fast).sites] == paths
