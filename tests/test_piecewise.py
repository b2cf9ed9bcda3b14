"""ForaConfig(fullgraph=False): models whose own code breaks Dynamo's graph are cached
piecewise — every captured graph's sites, one step decision per model call."""

from __future__ import annotations

import pytest
import torch
from reference import EagerFora
from torch import nn
from toy import Mlp16 as _Mlp

import fora_fx


class _Block(nn.Module):
    def __init__(self, break_inside: bool):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.break_inside = break_inside
        self.attn, self.mlp = Attention(16, heads=2, dim_head=8), _Mlp()

    def forward(self, x, t):
        x = x + t[:, None, None] * self.attn(x)
        if self.break_inside:  # Dynamo compiles this frame once and runs it for every block
            torch._dynamo.graph_break()
        return x + self.mlp(x)


class _Broken(nn.Module):
    """Three blocks and a Python-side graph break (as Lumina 2's `.tolist()` or OmniGen's
    branch on a tensor value make one), between blocks or inside each block."""

    def __init__(self, break_inside: bool):
        super().__init__()
        self.embed = nn.Linear(1, 16)
        self.blocks = nn.ModuleList([_Block(break_inside) for _ in range(3)])

    def forward(self, x, t):
        t = torch.sigmoid(self.embed(t[:, None] / 1000.0)).mean(-1)
        x = self.blocks[0](x, t)
        torch._dynamo.graph_break()  # outside a loop: Dynamo resumes after it in a new graph
        return self.blocks[2](self.blocks[1](x, t), t)


SITES = [f"blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp")]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # A graph break Dynamo cannot resume from makes it skip that code for the whole process
    # (see test_a_whole_forward_skipped_by_dynamo_is_refused): leave none for other tests.
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("break_inside", [False, True])
def test_piecewise_equals_the_eager_reference(break_inside):
    torch.manual_seed(0)
    model = _Broken(break_inside).eval()
    steps = [(torch.randn(2, 5, 16), torch.full((2,), 999.0 - 90 * k)) for k in range(7)]
    with torch.no_grad():
        ref = EagerFora(model, SITES, interval=3, num_steps=7)
        expected = [ref(*s) for s in steps] + [ref(*s) for s in steps]
        ref.remove()
        plain = [model(*s) for s in steps]
    fast = fora_fx.transform(model, interval=3, num_steps=7, compiler="eager", fullgraph=False)
    got = [fast(*s) for s in steps] + [fast(*s) for s in steps]  # two generations
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    assert torch.equal(got[0], plain[0]) and not torch.equal(got[1], plain[1])
    pattern = [True, False, False, True, False, False, True]  # last step recomputes
    assert fast._fora_runtime.stats.history == pattern * 2
    explanation = fora_fx.explain(fast)
    # Between blocks: a graph before the break and one after. Inside blocks: Dynamo runs
    # each block's frame as graphs of its own, the same graphs for every block; each
    # block keeps its own cache (6 sites' worth of buffers per branch).
    assert explanation.graphs_compiled >= 2
    assert explanation.cache_bytes == 6 * 2 * 5 * 16 * 4
    if break_inside:  # every block runs the graphs Dynamo compiled from block 0's frame
        assert explanation.runs == {"blocks.0.attn": 3, "blocks.0.mlp": 3}
        assert "its graph runs 3x per call" in str(explanation)
    else:
        assert not explanation.runs


def test_a_graph_break_says_how_to_cache_piecewise():
    fast = fora_fx.transform(_Broken(False).eval(), compiler="eager")
    with pytest.raises(RuntimeError, match="fullgraph=False"):
        fast(torch.randn(2, 5, 16), torch.full((2,), 999.0))


def test_piecewise_needs_transform():
    cfg = fora_fx.ForaConfig(compiler="eager", fullgraph=False)
    compiled = torch.compile(_Broken(False).eval(), backend=fora_fx.backend(cfg))
    with pytest.raises(Exception, match="works through fora_fx.transform only"):
        compiled(torch.randn(2, 5, 16), torch.full((2,), 999.0))


class _NoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()
        return self.b(x)


def test_piecewise_without_any_site_raises():
    fast = fora_fx.transform(_NoSites().eval(), compiler="eager", fullgraph=False)
    with pytest.raises(fora_fx.NoSitesError, match="2 graph"):
        fast(torch.randn(2, 5, 16))


class _LoopBroken(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(False) for _ in range(2)])

    def forward(self, x, t):
        for block in self.blocks:
            x = block(x, t)
            torch._dynamo.graph_break()  # in a loop: Dynamo skips this frame from now on
        return x


def test_a_whole_forward_skipped_by_dynamo_is_refused():
    x, t = torch.randn(2, 5, 16), torch.full((2,), 999.0)
    torch.manual_seed(0)
    piecewise = fora_fx.transform(_LoopBroken().eval(), compiler="eager", fullgraph=False)
    piecewise(x, t)
    # Now Dynamo runs _LoopBroken.forward eagerly and compiles each block's frame: under
    # fullgraph=True every block would count as a step of its own.
    fast = fora_fx.transform(_LoopBroken().eval(), compiler="eager")
    with pytest.raises(RuntimeError, match=r"ran 2 FORA graphs .* torch._dynamo.reset\(\)"):
        fast(x, t)
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="fullgraph=False"):  # the plain graph-break error
        fast(x, t)
