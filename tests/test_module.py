"""The transformed module is a drop-in; explain / reset / restore; errors say what is valid."""

from __future__ import annotations

import pytest
import torch
import toy
from zoo import make, output_tensor

import fora_fx

# One worker for all of this file (tests/run.sh): its tests share state.
pytestmark = pytest.mark.xdist_group("module")


@pytest.fixture(scope="module")
def dit():
    case = make("dit")
    return case, fora_fx.transform(case.model, interval=3, compiler="eager")


def test_attributes_and_state_pass_through(dit):
    case, fast = dit
    assert isinstance(fast, torch.nn.Module)
    assert fast.config is case.model.config  # diffusers config
    assert fast.dtype == torch.float32 and fast.device.type == "cpu"
    assert fast.transformer_blocks is case.model.transformer_blocks
    assert list(fast.state_dict()) == list(case.model.state_dict())
    assert [id(p) for p in fast.parameters()] == [id(p) for p in case.model.parameters()]
    assert fast.eval() is fast and not case.model.training and not fast.training
    assert fast.train().training and case.model.training
    fast.eval()
    fast.load_state_dict(case.model.state_dict())
    # Writes reach the model too: a flag set on the wrapper is the model's
    fast.fora_test_flag = 3
    assert case.model.fora_test_flag == 3 and "fora_test_flag" not in vars(fast)
    del fast.fora_test_flag
    assert not hasattr(case.model, "fora_test_flag")


def test_explain_lists_sites_bytes_and_graphs(dit):
    case, fast = dit
    with pytest.raises(ValueError, match="has not been captured yet"):
        fora_fx.explain(fora_fx.transform(case.model, compiler="eager"))
    args, kwargs = case.inputs(0, 0)
    ex = fora_fx.explain(fast, *args, **kwargs, graph=True)
    assert fora_fx.stats(fast).step == 0  # explain's capture call was undone by a reset
    assert [s.module_path for s in ex.sites] == case.explained
    assert ex.cache_bytes == sum(s.nbytes for s in ex.sites) == 4 * 2 * 16 * 32 * 4
    text = str(ex)
    assert "transformer_blocks.0.attn1" in text and "MiB cache" in text
    assert "fora_store_attn_0 = torch.ops.fora.store.default(fora_cache_attn_0" in text
    assert "fora_load_mlp_1 = torch.ops.fora.load.default(fora_cache_mlp_1)" in text


def test_restore_returns_original_and_frees_cache():
    case = make("timm")
    fast = fora_fx.transform(case.model, interval=2, compiler="eager")
    args, kwargs = case.inputs(0, 0)
    fast(*args, **kwargs)
    assert fora_fx.explain(fast).cache_bytes > 0
    assert fora_fx.restore(fast) is case.model
    assert fora_fx.stats(fast).graphs == 0 and fora_fx.stats(fast).cache_bytes == 0
    with torch.no_grad():
        case.model(*args, **kwargs)  # the original model is untouched
    with pytest.raises(RuntimeError, match="released by fora_fx.restore"):
        fast(*args, **kwargs)


def test_transform_argument_errors():
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        fora_fx.transform(lambda x: x)
    fast = fora_fx.transform(toy.Toy(), 2, compiler="eager")
    assert fast.fora_config.interval == 2
    with pytest.raises(TypeError, match="already transformed"):
        fora_fx.transform(fast)
    with pytest.raises(TypeError, match="config must be a ForaConfig or an int"):
        fora_fx.transform(toy.Toy(), "3")
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        fora_fx.transform(toy.Toy(), interval=0)
    with pytest.raises(TypeError, match="expected a module returned by fora_fx.transform"):
        fora_fx.reset("model")


def test_failed_call_invalidates_cache():
    fast = fora_fx.transform(toy.Toy(), interval=4, compiler="eager")
    assert fast(*toy.inputs(1)).item() == toy.recomputed(1)
    pair = fast._fora.pairs[0]  # fault injection: the compiled reuse variant fails
    reuse = pair.reuse

    def broken(*args):
        raise RuntimeError("device lost")

    pair.reuse = broken
    with pytest.raises(RuntimeError, match="device lost"):
        fast(*toy.inputs(2))
    pair.reuse = reuse
    # The step did not count, and nothing cached before the failure is trusted.
    assert fora_fx.stats(fast).step == 1
    assert fast(*toy.inputs(3)).item() == toy.recomputed(3)
    assert fast(*toy.inputs(4)).item() == toy.reused(4, 3)


def test_concurrent_call_is_refused():
    fast = fora_fx.transform(toy.Toy(), interval=2, compiler="eager")
    fast(*toy.inputs(1))
    rt = fast._fora
    rt._lock.acquire()  # another thread is mid-step
    try:
        with pytest.raises(RuntimeError, match="called while another call was running"):
            fast(*toy.inputs(2))
    finally:
        rt._lock.release()
    assert fast(*toy.inputs(2)).item() == toy.reused(2, 1)


def test_two_transformed_models_never_share_state():
    model = toy.Toy()
    a = fora_fx.transform(model, interval=3, compiler="eager")
    b = fora_fx.transform(model, interval=3, compiler="eager")
    assert a(*toy.inputs(1)).item() == toy.recomputed(1)
    assert b(*toy.inputs(5)).item() == toy.recomputed(5)
    assert a(*toy.inputs(2)).item() == toy.reused(2, 1)
    assert b(*toy.inputs(6)).item() == toy.reused(6, 5)
    assert output_tensor(a(*toy.inputs(3))).item() == toy.reused(3, 1)


def test_models_compiled_by_name_keep_their_own_state():
    # Dynamo shares one compiled entry between these two (same class, shapes and backend):
    # the state must still be per model.
    opts = {"interval": 3, "compiler": "eager"}
    a = torch.compile(toy.Toy(), backend="fora", options=opts)
    b = torch.compile(toy.Toy(), backend="fora", options=opts)
    assert a(*toy.inputs(1)).item() == toy.recomputed(1)
    assert b(*toy.inputs(5)).item() == toy.recomputed(5)
    assert a(*toy.inputs(2)).item() == toy.reused(2, 1)
    assert b(*toy.inputs(6)).item() == toy.reused(6, 5)
    fora_fx.reset(b)
    assert b(*toy.inputs(7)).item() == toy.recomputed(7)
    assert a(*toy.inputs(3)).item() == toy.reused(3, 1)


def test_many_models_of_one_class_exceed_no_recompile_limit():
    # More transformed instances (different configs -> different Dynamo entries) than
    # torch._dynamo.config.recompile_limit allows per code object.
    models = [fora_fx.transform(toy.Toy(), interval=i, compiler="eager") for i in range(2, 14)]
    for m in models:
        assert m(*toy.inputs(1)).item() == toy.recomputed(1)
        assert m(*toy.inputs(2)).item() == toy.reused(2, 1)


GOLDEN_REUSE = """\
    t = l_t_.view(-1, 1, 1, 1)
    h = l_x_ * t
    fora_load_attn_0 = torch.ops.fora.load.default(fora_cache_attn_0)
    mul_1 = t * fora_load_attn_0
    h1 = h + mul_1
    fora_load_mlp_0 = torch.ops.fora.load.default(fora_cache_mlp_0)
    add_1 = h1 + fora_load_mlp_0
    return (add_1,)"""


def test_golden_rewritten_toy_graphs():
    fast = fora_fx.transform(toy.Toy(), interval=3, compiler="eager")
    ex = fora_fx.explain(fast, *toy.inputs(1), graph=True)
    reuse = ex.graphs["reuse"].split("\n", 1)[1]  # drop the `def forward(...)` line
    assert reuse == GOLDEN_REUSE
    refresh = ex.graphs["refresh"]
    assert "fora_store_attn_0 = torch.ops.fora.store.default(fora_cache_attn_0, " \
           "scaled_dot_product_attention)" in refresh
    assert "fora_store_mlp_0 = torch.ops.fora.store.default(fora_cache_mlp_0, linear_1)" \
           in refresh


def test_training_mode_warns():
    model = toy.Toy().train()
    with pytest.warns(UserWarning, match=r"training mode.*model.eval\(\)"):
        fora_fx.transform(model)


def test_dtype_change_recomputes():
    fast = fora_fx.transform(toy.Toy(), interval=3, compiler="eager")  # float64
    assert fast(*toy.inputs(1)).item() == toy.recomputed(1)
    assert fast(*toy.inputs(2)).item() == toy.reused(2, 1)
    fast.to(torch.float32)  # step 2 would reuse, but the float32 graph has no valid cache
    x, t = (a.float() for a in toy.inputs(3))
    out = fast(x, t)
    assert out.dtype == torch.float32 and out.item() == toy.recomputed(3)
    assert fora_fx.stats(fast).history == [True, False, True]


def test_deleting_the_model_frees_its_cache():
    import gc
    import weakref

    fast = fora_fx.transform(toy.Toy(), interval=2, compiler="eager")
    fast(*toy.inputs(1))
    (buffers,) = fast._fora.branches["default"].buffers.values()
    refs = [weakref.ref(b) for b in buffers]
    del fast, buffers
    gc.collect()
    assert all(r() is None for r in refs)


class LazyTable(toy.Toy):
    """Builds a table on its first call inside `with torch.device("cpu")`, which Dynamo
    does not capture (Bria FIBO 2's rotary embedder does so)."""

    def __init__(self) -> None:
        super().__init__()
        self.table: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            with torch.device("cpu"):
                self.table = torch.ones(1, dtype=torch.float64)
        return super().forward(x * self.table, t)


def test_a_break_on_the_first_call_only_says_to_call_the_model_once():
    torch._dynamo.reset()
    model = LazyTable()
    fast = fora_fx.transform(model, interval=3, compiler="eager")
    with pytest.raises(RuntimeError, match="as one graph.*call the untransformed model once"):
        fast(*toy.inputs(1))
    fora_fx.restore(fast)
    torch._dynamo.reset()
    model(*toy.inputs(1))  # the table is built
    fast = fora_fx.transform(model, interval=3, compiler="eager")
    assert [fast(*toy.inputs(t)).item() for t in (1, 2)] == [toy.recomputed(1),
                                                             toy.reused(2, 1)]
