"""In-place writes and metadata-only reads inside a cache site (passes/effects.py).

Wan's rotary embedding fills a fresh `empty_like` buffer in place and casts with
`type_as(query)`; CogVideoX writes its rotary embedding into the query in place. Such a
module is cacheable; one that writes into anything it did not allocate, or whose output
is written after it is computed, or that adds its input back through a buffer, is not.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from fora_fx.passes import locate, specialize
from fora_fx.passes.effects import Memory, data_inputs, writes
from torch import nn

import fora_fx
from fora_fx.capture import capture


class Attn(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.mode in ("rope", "rope_output_written"):  # Wan: fill a fresh buffer
            out = torch.empty_like(q)
            out[..., 0::2] = q[..., 1::2]
            out[..., 1::2] = -q[..., 0::2]
            q = out.type_as(q)
        elif self.mode == "rope_into_query":  # CogVideoX: write into the query itself
            q = F.layer_norm(q, (16,))
            q[..., 8:] = q[..., 8:].flip(-1)
        elif self.mode == "writes_input":
            x.mul_(2.0)
        # Wan casts the attention back with type_as(query): a read of the dtype only.
        o = self.proj(F.scaled_dot_product_attention(q, k, v).type_as(q))
        if self.mode == "rope_output_written":
            o[..., 0] = 0.0
        elif self.mode == "residual_via_buffer":
            buf = torch.zeros_like(x)
            buf[:] = x
            o = o + buf
        return o


class Block(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.norm, self.attn, self.out = nn.LayerNorm(16), Attn(mode), nn.Linear(16, 16)

    def forward(self, x):
        return self.out(x + self.attn(self.norm(x)))


def _locate(mode: str):
    torch.manual_seed(0)
    model = Block(mode).eval()
    gm, example = capture(model, torch.randn(2, 5, 16))
    return model, gm, example, locate(gm)


@pytest.mark.parametrize("mode", ["rope", "rope_into_query"])
def test_writes_into_the_modules_own_memory_are_cached(mode):
    _, gm, example, result = _locate(mode)
    assert [s.module_path for s in result.sites] == ["attn"], result.refused
    assert any(writes(n) for n in gm.graph.nodes)
    # The reuse graph drops the writes with the rest of the region (DCE alone keeps them).
    reuse = specialize(gm, result.sites, False)
    assert not any(n.target is operator.setitem for n in reuse.graph.nodes)
    assert sum(n.target is F.linear for n in reuse.graph.nodes) == 1  # only self.out


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("writes_input", "writes layer_norm in place"),
        ("rope_output_written", "is written in place by setitem"),
        ("residual_via_buffer", "residual added inside the module"),
    ],
)
def test_unsafe_writes_are_refused_with_a_reason(mode, reason):
    _, _, _, result = _locate(mode)
    assert result.sites == []
    (refusal,) = result.refused
    assert refusal.module_path == "attn" and reason in refusal.reason, refusal.reason


def test_metadata_only_arguments_carry_no_values():
    _, gm, _, _ = _locate("rope")
    empty = next(n for n in gm.graph.nodes if n.target is torch.empty_like)
    cast = next(n for n in gm.graph.nodes if n.target == "type_as")  # out.type_as(q)
    assert data_inputs(empty) == []
    assert data_inputs(cast) == [cast.args[0]]
    memory = Memory(gm.graph.nodes)
    setitems = [n for n in gm.graph.nodes if n.target is operator.setitem]
    assert [memory.owner(writes(w)[0]) for w in setitems] == [empty, empty]
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    assert memory.owner(x) is None  # a graph input may alias anything


def test_rope_module_runs_through_fora_like_the_eager_model():
    model, _, _, _ = _locate("rope")
    xs = [torch.randn(2, 5, 16) for _ in range(3)]
    with torch.no_grad():
        plain = [model(x) for x in xs]
    fast = fora_fx.transform(model, interval=2, compiler="eager")
    with torch.no_grad():
        got = [fast(x) for x in xs]
    assert fora_fx.stats(fast).history == [True, False, True]
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], plain[2], rtol=0, atol=0)
    assert not torch.allclose(got[1], plain[1])  # step 1 replayed step 0's attention


class _RoutedBlock(nn.Module):
    """A block that normalises its MLP's per-token weights by group sums it accumulates with
    an in-place `scatter_add_` into a fresh `torch.zeros`, whose result it never reads
    (NucleusMoE's router). Every block allocates the same buffer."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn, self.router = Attention(16, heads=2, dim_head=8), nn.Linear(16, 1)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x):
        x = x + self.attn(x)
        scores = torch.sigmoid(self.router(x)).flatten()
        group = torch.arange(scores.shape[0]) % 3
        sums = torch.zeros(3)
        sums.scatter_add_(0, group, scores)
        weight = scores / (sums[group] + 1e-12)
        return x + weight.view(x.shape[0], x.shape[1], 1) * self.mlp(x)


class _Routed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_RoutedBlock(), _RoutedBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("batch_blocks", [True, False])
def test_in_place_method_writes_survive_dead_code_removal(batch_blocks):
    # Before: the graph-wide DCE of the batch / reuse passes dropped `scatter_add_` (FX only
    # counts in-place *functions* as impure), and the batch pass gave both blocks one
    # `zeros` buffer: the refresh step divided by zero sums.
    from reference import EagerFora

    torch.manual_seed(0)
    model = _Routed().eval()
    xs = [torch.randn(2, 5, 16) for _ in range(3)]
    with torch.no_grad():
        ref = EagerFora(model, [f"blocks.{i}.{s}" for i in (0, 1) for s in ("attn", "mlp")],
                        interval=3)
        expected = [ref(x) for x in xs]
        ref.remove()
        with fora_fx.tuning.patch(batch_blocks=batch_blocks):
            fast = fora_fx.transform(model, interval=3, compiler="eager")
        got = [fast(x) for x in xs]
    assert torch.equal(got[0], expected[0])  # the refresh step is the plain model's
    for g, e in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert len(fora_fx.explain(fast).sites) == 4


def test_operator_and_is_not_an_in_place_write():
    gm = torch.fx.symbolic_trace(lambda a, b: (a & b) | a)
    ops = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in ops] == [operator.and_, operator.or_]
    assert [writes(n) for n in ops] == [[], []]
