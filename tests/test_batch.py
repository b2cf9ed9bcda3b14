"""The batch pass (passes/batch.py) and parameter stacks (fora_fx/stacks.py): batching the
blocks' conditioning changes no result, shares parameter storage instead of copying it, and
never computes with a weight the model no longer has."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from zoo import CASES, make, run_steps

import fora_fx
from fora_fx import stacks
from fora_fx.capture import capture
from fora_fx.compile import fusion_limit_patches

SEED = 3


def _run(model, case, steps, seed=SEED):
    return run_steps(model, case, steps, seed)


def _batched(fast) -> dict[str, list]:
    return fora_fx.explain(fast).batched


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", sorted(CASES))
def test_batching_changes_no_result(name):
    case = make(name)
    with fora_fx.tuning.patch(batch_blocks=False):
        plain = fora_fx.transform(copy.deepcopy(case.model), interval=2, compiler="eager")
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    expected, got = _run(plain, case, 5), _run(fast, case, 5)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert _batched(plain) == {}


@pytest.mark.parametrize("name, runs", [("dit", 1), ("pixart", 1), ("sd3", 1), ("timm", 1)])
def test_reuse_graph_batches_the_blocks(name, runs):
    case = make(name)
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    _run(fast, case, 2)
    reuse = _batched(fast)["reuse"]
    assert len(reuse) == runs and reuse[0].blocks == (0, 1) and reuse[0].stacks
    explained = fora_fx.explain(fast)
    assert "reuse graph: transformer_blocks x2" in str(explained) or name == "timm"
    code = explained.graphs["reuse"]
    assert "fora_stack_0_0" in code and "aten.select" in code


def test_dit_parameters_share_one_stack_and_restore_separates_them():
    case = make("dit")
    blocks = case.model.transformer_blocks
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    before = [b.norm1.linear.weight.detach().clone() for b in blocks]
    _run(fast, case, 1)
    w0, w1 = (b.norm1.linear.weight for b in blocks)
    assert w0.untyped_storage().data_ptr() == w1.untyped_storage().data_ptr()  # no copy
    for b, value in zip(blocks, before, strict=True):  # values unchanged
        torch.testing.assert_close(b.norm1.linear.weight, value, rtol=0, atol=0)
    model = fora_fx.restore(fast)
    assert model.transformer_blocks[0].norm1.linear.weight.untyped_storage().data_ptr() != (
        model.transformer_blocks[1].norm1.linear.weight.untyped_storage().data_ptr()
    )


def test_in_place_weight_change_reaches_the_stack():
    case = make("dit")
    other = copy.deepcopy(case.model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    _run(fast, case, 3)
    fast.load_state_dict(other.state_dict())  # copies into the (stacked) parameters
    fora_fx.reset(fast)
    with fora_fx.tuning.patch(batch_blocks=False):
        reference = fora_fx.transform(other, interval=2, compiler="eager")
    for e, g in zip(_run(reference, case, 4), _run(fast, case, 4), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_new_parameter_storage_is_never_read_stale(compiler):
    """`p.data = t` unlinks a parameter from its stack; the next generation re-stacks."""
    case = make("dit")
    fast = fora_fx.transform(case.model, interval=2, compiler=compiler)
    _run(fast, case, 3)
    weight = case.model.transformer_blocks[1].norm1.linear.weight
    weight.data = torch.randn_like(weight) * 0.3  # new storage, new values
    assert not stacks.valid([b.norm1.linear.weight for b in case.model.transformer_blocks],
                            stacks._HOME[case.model.transformer_blocks[0].norm1.linear.weight][0])
    fora_fx.reset(fast)
    with fora_fx.tuning.patch(batch_blocks=False):
        reference = fora_fx.transform(copy.deepcopy(case.model), interval=2, compiler="eager")
    for e, g in zip(_run(reference, case, 4), _run(fast, case, 4), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_stack_refuses_mismatched_parameters():
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="different shape"):
        stacks.stack([a, b])
    with pytest.raises(ValueError, match="different shape"):
        stacks.stack([a, a])


def test_inductor_batched_equals_unbatched():
    case = make("dit")
    with fora_fx.tuning.patch(batch_blocks=False, reuse_fusion_limit=None):
        plain = fora_fx.transform(copy.deepcopy(case.model), interval=2)
    fast = fora_fx.transform(case.model, interval=2)
    for e, g in zip(_run(plain, case, 4), _run(fast, case, 4), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert _batched(fast)["reuse"]


def test_config_validates_new_fields():
    with pytest.raises(TypeError, match="batch_blocks must be a bool"):
        fora_fx.tuning.Tuning(batch_blocks=1)
    with pytest.raises(ValueError, match="reuse_fusion_limit must be an int >= 2"):
        fora_fx.tuning.patch(reuse_fusion_limit=1).__enter__()
    with pytest.raises(ValueError, match=r"fast_calls must be one of \('direct', 'unguarded'"):
        fora_fx.tuning.Tuning(fast_calls="never")
    assert fusion_limit_patches(None) == {}
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "max_fusion_unique_io_buffers"):
        assert fusion_limit_patches(16) == {"max_fusion_unique_io_buffers": 16}


@settings(max_examples=6)
@given(
    depth=st.integers(2, 4),
    heads=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([8, 16]),
    interval=st.integers(2, 4),
    seed=st.integers(0, 2**16),
)
def test_random_dits_batched_equal_unbatched(depth, heads, head_dim, interval, seed):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim,
                                  in_channels=4, out_channels=4, num_layers=depth,
                                  sample_size=4, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.ne(0).any()):  # adaLN-Zero: give every gate a value
                p.normal_(0, 0.05)
    with fora_fx.tuning.patch(batch_blocks=False):
        plain = fora_fx.transform(copy.deepcopy(model), interval=interval, compiler="eager")
    fast = fora_fx.transform(model, interval=interval, compiler="eager")
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([1, 3])
    for k in range(interval + 2):
        t = torch.full((2,), 900.0 - 100 * k)
        with torch.no_grad():
            e = plain(x, timestep=t, class_labels=y).sample
            o = fast(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)
    (run,) = _batched(fast)["reuse"]
    assert run.blocks == tuple(range(depth)) and len(run.stacks) == 7


def test_outside_duplicates_merge_only_pure_nodes():
    from fora_fx.passes.batch import merge_outside_duplicates

    class M(torch.nn.Module):
        def forward(self, x):
            a, b = torch.sin(x), torch.sin(x)  # one value computed twice: merged
            r1, r2 = torch.rand_like(x), torch.rand_like(x)  # two draws: kept
            y = x.clone()
            y.add_(1)
            y.add_(1)  # two writes: kept
            return a + b + r1 + r2 + y

    gm, _ = capture(M(), torch.randn(3))  # the pass reads the values Dynamo traced
    assert merge_outside_duplicates(gm, {}) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(torch.sin) == 1 and targets.count(torch.rand_like) == 2
    assert targets.count("add_") == 2
    # Without traced values, the write into y could be into x: nothing is merged.
    assert merge_outside_duplicates(torch.fx.symbolic_trace(M()), {}) == 0


def test_reads_of_a_tensor_written_between_them_are_not_merged():
    from fora_fx.passes.batch import merge_outside_duplicates

    class M(torch.nn.Module):
        def forward(self, x):
            a = x * 2
            x.add_(1)  # a graph input written in place
            b = x * 2  # the same node reads x again: another value
            t = torch.arange(4.0)
            u = torch.arange(4.0)
            t /= 2  # two tables, one written: two buffers
            return a + b + t + u

    gm, _ = capture(M(), torch.randn(4))
    assert merge_outside_duplicates(gm, {}) == 0


def test_dit_final_layer_reads_block_0s_batched_conditioning():
    """DiT's final layer re-runs block 0's embedder; after batching it must not run it
    again from block 0's own weights."""
    case = make("dit")
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    _run(fast, case, 2)
    for variant, code in fora_fx.explain(fast).graphs.items():
        signature, body = code.split("\n", 1)
        (weight,) = re.findall(r"\w*blocks_modules_0_\w*linear_1_parameters_weight\w*", signature)
        assert re.search(rf"\b{weight}\b", body) is None, variant  # read by nothing


class _Blocks(torch.nn.Module):
    """h = h + lin_i(c) per block: the conditioning is batchable, the stream is not."""

    def __init__(self, width: int, depth: int = 3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, h, c):
        for block in self.blocks:
            h = h + block(c)
        return h


def test_stacks_keep_every_slice_16_byte_aligned():
    from fora_fx.passes import batch_blocks

    from fora_fx.capture import capture, module_paths

    for width, batched in ((4, True), (3, False)):  # fp32: 4x4 = 64 B; 3x3 = 36 B per weight
        model = _Blocks(width)
        gm, _ = capture(model, torch.randn(2, width), torch.randn(2, width))
        assert bool(batch_blocks(gm, module_paths(model))) is batched, width
