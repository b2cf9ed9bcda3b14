"""ForaConfig(piecewise=Piecewise(...)): models whose own code breaks Dynamo's graph are cached
piecewise — every captured graph's sites, one step decision per model call."""

from __future__ import annotations

import pytest
import torch
import toy
from reference import EagerFora
from torch import nn
from toy import Mlp16 as _Mlp

import fora_fx

PIECES = fora_fx.Piecewise()


def hooked(*patterns: str) -> fora_fx.Piecewise:
    return fora_fx.Piecewise(hook_sites=patterns)


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
    fast = fora_fx.transform(model, interval=3, num_steps=7, compiler="eager", piecewise=PIECES)
    got = [fast(*s) for s in steps] + [fast(*s) for s in steps]  # two generations
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    assert torch.equal(got[0], plain[0]) and not torch.equal(got[1], plain[1])
    pattern = [True, False, False, True, False, False, True]  # last step recomputes
    assert fora_fx.stats(fast).history == pattern * 2
    explanation = fora_fx.explain(fast)
    # Between blocks: a graph before the break and one after. Inside blocks: Dynamo runs
    # each block's frame as graphs of its own, the same graphs for every block; each
    # block keeps its own cache (6 sites' worth of buffers per branch).
    assert explanation.graphs_compiled >= 2
    assert explanation.cache_bytes == 6 * 2 * 5 * 16 * 4
    # Every site is listed under its own block, also where block 0's graph runs them all.
    assert [s.module_path for s in explanation.sites] == SITES
    if break_inside:  # every block runs the graphs Dynamo compiled from block 0's frame
        assert explanation.runs == dict.fromkeys(SITES, 3)
        assert "blocks.2.mlp   mlp        [2x5x16] 640 B  (one graph for 3 blocks" in str(
            explanation)
    else:
        assert not explanation.runs


def test_a_graph_break_says_how_to_cache_piecewise():
    fast = fora_fx.transform(_Broken(False).eval(), compiler="eager")
    with pytest.raises(RuntimeError, match=r"piecewise=fora_fx.Piecewise\(\)"):
        fast(torch.randn(2, 5, 16), torch.full((2,), 999.0))


def test_piecewise_needs_transform():
    cfg = fora_fx.ForaConfig(compiler="eager", piecewise=PIECES)
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
    fast = fora_fx.transform(_NoSites().eval(), compiler="eager", piecewise=PIECES)
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
    piecewise = fora_fx.transform(_LoopBroken().eval(), compiler="eager", piecewise=PIECES)
    piecewise(x, t)
    # Now Dynamo runs _LoopBroken.forward eagerly and compiles each block's frame: under
    # fullgraph=True every block would count as a step of its own.
    fast = fora_fx.transform(_LoopBroken().eval(), compiler="eager")
    with pytest.raises(RuntimeError, match=r"ran 2 FORA graphs .* torch._dynamo.reset\(\)"):
        fast(x, t)
    torch._dynamo.reset()
    # the plain graph-break error
    with pytest.raises(RuntimeError, match=r"piecewise=fora_fx.Piecewise\(\)"):
        fast(x, t)


class _BreakingMlp(nn.Module):
    """An MLP whose forward Dynamo cannot capture whole (HiDream-I1's MoE loops over
    `bincount()`): the graphs around the break hold no whole MLP to cache."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.fc2(h)


class _HookBlock(nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn, self.mlp = Attention(16, heads=2, dim_head=8), _BreakingMlp()

    def forward(self, x, t):
        x = x + t[:, None, None] * self.attn(x)
        return x + self.mlp(x)


class _Loop(nn.Module):
    """Two blocks called in a loop; with `graph_breaks`, a break after each block, so that
    Dynamo compiles each block's own frame."""

    def __init__(self, block, graph_breaks=False):
        super().__init__()
        self.blocks = nn.ModuleList([block() for _ in range(2)])
        self.graph_breaks = graph_breaks

    def forward(self, x, t):
        t = t / 1000.0
        for block in self.blocks:
            x = block(x, t)
            if self.graph_breaks:
                torch._dynamo.graph_break()
        return x


def _reference(model, sites, steps):
    with torch.no_grad():
        ref = EagerFora(model, sites, interval=3, num_steps=len(steps))
        out = [ref(*s) for s in steps] + [ref(*s) for s in steps]
        ref.remove()
    return out


def test_hook_sites_cache_a_module_dynamo_cannot_capture():
    torch.manual_seed(0)
    model = _Loop(_HookBlock).eval()
    steps = [(torch.randn(2, 5, 16), torch.full((2,), 999.0 - 90 * k)) for k in range(7)]
    attn = [f"blocks.{i}.attn" for i in range(2)]
    mlps = [f"blocks.{i}.mlp" for i in range(2)]
    # Piecewise alone caches the attentions; the MLPs run on every step, and explain says so
    # (the MLP's pieces hold no candidate, but their block's attention is cached).
    fast = fora_fx.transform(model, interval=3, num_steps=7, compiler="eager", piecewise=PIECES)
    got = [fast(*s) for s in steps] + [fast(*s) for s in steps]
    for k, (g, e) in enumerate(zip(got, _reference(model, attn, steps), strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    explanation = fora_fx.explain(fast)
    assert explanation.uncached == ["blocks.0.mlp", "blocks.1.mlp"]  # per block
    assert "can be cached around its call: fora_fx.Piecewise(hook_sites=" in str(explanation)
    fora_fx.restore(fast)
    torch._dynamo.reset()
    # Named in hook_sites, the MLPs are cached too: what the paper's hooks compute.
    fast = fora_fx.transform(model, interval=3, num_steps=7, compiler="eager",
                             piecewise=hooked("blocks.*.mlp"))
    got = [fast(*s) for s in steps] + [fast(*s) for s in steps]
    for k, (g, e) in enumerate(zip(got, _reference(model, attn + mlps, steps), strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    assert fora_fx.stats(fast).history == [True, False, False, True, False, False, True] * 2
    explanation = fora_fx.explain(fast)
    assert explanation.hooked == mlps
    assert "cached around the module call (hook_sites" in str(explanation)
    assert explanation.cache_bytes == 4 * 2 * 5 * 16 * 4  # 2 attentions + 2 MLP outputs
    assert all("forward" in model.blocks[i].mlp.__dict__ for i in range(2))
    assert fora_fx.restore(fast) is model
    assert not any("forward" in model.blocks[i].mlp.__dict__ for i in range(2))


def test_hook_sites_are_checked():
    with pytest.raises(TypeError, match=r"use piecewise=fora_fx.Piecewise\(hook_sites=...\)"):
        fora_fx.ForaConfig(hook_sites=("blocks.*.mlp",))
    with pytest.raises(TypeError, match="module-path patterns"):
        fora_fx.Piecewise(hook_sites=(3,))
    with pytest.raises(ValueError, match=r"'blocks\.\*\.ffn' names no module .* mlp"):
        fora_fx.transform(_Loop(_HookBlock).eval(), piecewise=hooked("blocks.*.ffn"))


def test_a_hook_site_output_written_in_place_is_not_reused():
    class Writer(_Loop):
        def forward(self, x, t):
            for block in self.blocks:
                y = block.mlp(x)
                y.mul_(0.5)  # the model writes into the module's output
                x = x + y
            return x

    fast = fora_fx.transform(Writer(_HookBlock).eval(), interval=3, compiler="eager",
                             piecewise=hooked("blocks.*.mlp"))
    x, t = torch.randn(2, 5, 16), torch.full((2,), 999.0)
    fast(x, t)
    with pytest.raises(RuntimeError, match="modified in place"):
        fast(x, t)


def test_hidream_moe_in_hook_sites_equals_the_eager_reference():
    """HiDream-I1's MoE feed-forward loops over bincount(): Dynamo cannot capture it. Named
    in hook_sites, every block's `ff_i` is cached with its attention and text FFN, and the
    model samples what the paper's hooks sample on the same modules."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, caption_channels=[24, 20],
        text_emb_dim=16, axes_dims_rope=(4, 6, 6), max_resolution=(8, 8),
        llama_layers=[0, 1, 2, 3], num_routed_experts=4, num_activated_experts=2).eval()
    with torch.no_grad():  # zero-initialised gates and output layers would hide the sites
        for p in model.parameters():
            if not bool(p.ne(0).any()):
                p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(1)
    steps = [dict(hidden_states=torch.randn(2, 4, 8, 8, generator=gen),
                  timesteps=torch.full((2,), 999.0 - 100 * k),
                  encoder_hidden_states_t5=torch.randn(2, 6, 24, generator=gen),
                  encoder_hidden_states_llama3=torch.randn(4, 2, 6, 20, generator=gen),
                  pooled_embeds=torch.randn(2, 16, generator=gen), return_dict=False)
             for k in range(5)]
    sites = [f"double_stream_blocks.{i}.block.{s}" for i in range(2)
             for s in ("attn1", "ff_t", "ff_i")]
    sites += [f"single_stream_blocks.{i}.block.{s}" for i in range(2) for s in ("attn1", "ff_i")]
    with torch.no_grad():
        ref = EagerFora(model, sites, interval=3, num_steps=5)
        expected = [ref(**s)[0] for s in steps]
        ref.remove()
    # Without hook_sites, explain names the MoE modules as running on every step.
    plain = fora_fx.transform(model, compiler="eager", piecewise=PIECES)
    plain(**steps[0])
    # Every MoE module, each named once per block although several graphs (the MoE's
    # pieces, each run for every block) hold it.
    assert fora_fx.explain(plain).uncached == [p for p in sites if p.endswith("ff_i")]
    fora_fx.restore(plain)
    torch._dynamo.reset()
    fast = fora_fx.transform(model, interval=3, num_steps=5, compiler="eager",
                             piecewise=hooked("*.ff_i"))
    got = [fast(**s)[0] for s in steps]
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    assert fora_fx.stats(fast).history == [True, False, False, True, True]
    explanation = fora_fx.explain(fast)
    assert explanation.hooked == [p for p in sites if p.endswith("ff_i")]
    # the graphs Dynamo compiled from each kind of block's frame, listed for every block
    assert sorted(s.module_path for s in explanation.sites) == sorted(
        p for p in sites if not p.endswith("ff_i"))


def test_a_hook_site_called_with_new_shapes_recomputes():
    """A reuse step whose hooked module sees other input shapes than at the refresh (a new
    resolution) computes it, as a graph met with new shapes does, and never returns the
    other shape's output."""
    torch.manual_seed(0)
    model = _Loop(_HookBlock).eval()
    fast = fora_fx.transform(model, interval=3, compiler="eager", piecewise=hooked("blocks.*.mlp"))
    t = torch.full((2,), 999.0)
    a, b = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with torch.no_grad():
        expected = model(b, t)
    fast(a, t)  # step 0: refresh at 5 tokens
    torch.testing.assert_close(fast(b, t), expected)  # step 1: 7 tokens, every site new
    assert fora_fx.stats(fast).history == [True, True]


class _ParallelBlock(nn.Module):
    """Flux's single block: attention and an MLP half concatenated into one projection."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(16, heads=2, dim_head=8)
        self.proj_mlp, self.proj_out = nn.Linear(16, 32), nn.Linear(48, 16)

    def forward(self, x, t):
        h = torch.cat([self.attn(x), torch.nn.functional.gelu(self.proj_mlp(x))], dim=2)
        return x + t[:, None, None] * self.proj_out(h)


def test_a_parallel_block_compiled_from_its_own_frame_is_one_site():
    """No node of a graph compiled from the block's own frame has the block in its module
    stack; the parallel site is still found, named after the block (HunyuanImage 2.1's
    single blocks, piecewise, had only their attention cached)."""
    torch.manual_seed(0)
    model = _Loop(_ParallelBlock, graph_breaks=True).eval()
    steps = [(torch.randn(2, 5, 16), torch.full((2,), 999.0 - 90 * k)) for k in range(7)]
    expected = _reference(model, [f"blocks.{i}.proj_out" for i in range(2)], steps)
    fast = fora_fx.transform(model, interval=3, num_steps=7, compiler="eager", piecewise=PIECES)
    got = [fast(*s) for s in steps] + [fast(*s) for s in steps]
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"call {k}")
    explanation = fora_fx.explain(fast)
    assert [(s.module_path, s.kind) for s in explanation.sites] == [
        ("blocks.0", "parallel"), ("blocks.1", "parallel")]
    assert explanation.uncached == []


def test_piecewise_models_beyond_dynamos_recompile_limit_are_still_cached():
    # Without fullgraph, Dynamo runs a frame uncompiled past its code object's recompile
    # limit instead of raising; every model of a class counts toward it. The second model
    # here ran uncompiled and was refused with "found no attention or MLP site".
    with torch._dynamo.config.patch(recompile_limit=1):
        for compiler in ("eager", "aot_eager"):  # two backends: two cache entries
            fast = fora_fx.transform(toy.Toy(), interval=2, compiler=compiler,
                                     piecewise=fora_fx.Piecewise())
            out = [fast(*toy.inputs(t)).item() for t in (1.0, 2.0)]
            assert out == [toy.recomputed(1), toy.reused(2, 1)]
            assert fora_fx.stats(fast).graphs == 1


def test_a_piecewise_call_dynamo_ran_uncompiled_says_so():
    fast = fora_fx.transform(toy.Toy(), interval=2, compiler="eager",
                             piecewise=fora_fx.Piecewise())
    with torch.compiler.set_stance("force_eager"):  # Dynamo runs the frame as written
        with pytest.raises(RuntimeError, match="without compiling any of it"):
            fast(*toy.inputs(1.0))
    assert fora_fx.stats(fast).step == 0
