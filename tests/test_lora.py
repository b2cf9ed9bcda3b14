"""LoRA adapters (peft, as diffusers loads them) on every Linear: the same sites are found,
the adaLN Linears are still narrowed and batched, and the result equals the eager FORA
reference on the adapted model, before and after the adapters change."""

from __future__ import annotations

import copy

import pytest
import torch
from fora_fx.passes import locate
from fora_fx.passes.lora import find_adapted
from peft import LoraConfig, inject_adapter_in_model
from reference import EagerFora
from zoo import CASES, make, output_tensor

import fora_fx
from fora_fx.capture import capture, module_paths

STEPS = 5


def _run(model, case, seed=0):
    with torch.no_grad():
        return [output_tensor(model(*a, **kw)).clone()
                for a, kw in (case.inputs(k, seed) for k in range(STEPS))]


def _linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _adapt(model: torch.nn.Module, name: str = "default", dropout: float = 0.0,
           targets: list[str] | None = None) -> None:
    """A rank-2 LoRA on every Linear, its B not zero (peft's default B is zero, a no-op)."""
    config = LoraConfig(r=2, lora_alpha=2, lora_dropout=dropout,
                        target_modules=targets or _linears(model), init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name=name)


def _shape(explanation) -> tuple:
    return ([(s.module_path, s.kind) for s in explanation.sites], explanation.pruned,
            {v: [(b.prefix, b.blocks) for b in runs] for v, runs in explanation.batched.items()})


@pytest.mark.shares_captures
@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_on_every_linear_keeps_every_site_and_equals_the_reference(name):
    case = make(name)
    fast = fora_fx.transform(case.model, interval=3, num_steps=STEPS, compiler="eager")
    _run(fast, case)
    plain = _shape(fora_fx.explain(fast))
    fora_fx.restore(fast)

    torch.manual_seed(3)
    _adapt(case.model)
    ref = EagerFora(case.model, case.sites, interval=3, num_steps=STEPS)
    expected = _run(ref, case)
    ref.remove()
    fast = fora_fx.transform(case.model, interval=3, num_steps=STEPS, compiler="eager")
    got = _run(fast, case)
    explanation = fora_fx.explain(fast)
    # Same sites, same adaLN Linears narrowed on reuse steps, same blocks batched (their
    # stacks now hold the adapters' weights too).
    assert _shape(explanation) == plain
    assert explanation.uncached == []
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=f"step {k}")
    fora_fx.restore(fast)


def test_lora_two_adapters_and_dropout_are_seen_through():
    case = make("flux")
    linears = _linears(case.model)
    torch.manual_seed(3)
    _adapt(case.model, "a", dropout=0.1, targets=linears)  # a dropout node before its A
    _adapt(case.model, "b", targets=linears)
    for module in case.model.modules():
        if hasattr(module, "lora_A"):
            module.set_adapter(["a", "b"])
    args, kwargs = case.inputs(0, 0)
    gm, _ = capture(case.model, *args, **kwargs)
    adapted = find_adapted(gm.graph.nodes)
    # Every Linear is adapted once, as one projection over both adapters.
    assert len(adapted) == len(linears)
    assert all(sum(1 for p in parts if p.op == "call_function"
                   and p.target is torch._C._nn.linear) == 4 for _, parts in adapted.values())
    result = locate(gm, module_paths(case.model))
    assert sorted(s.module_path for s in result.sites) == sorted(case.explained)


class _HandWritten(torch.nn.Module):
    """A base Linear and a rank-2 A -> B pair written by hand, summed by `forward`."""

    def __init__(self, forward) -> None:
        super().__init__()
        self.base = torch.nn.Linear(4, 4)
        self.a = torch.nn.Linear(4, 2, bias=False)
        self.b = torch.nn.Linear(2, 4, bias=False)
        self.sum = forward

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.sum(self, *xs)


def test_lora_shape_only_when_the_adapter_reads_what_the_base_reads():
    model = _HandWritten(lambda m, x, y: m.base(x) + m.b(m.a(y)) * 0.5)
    x = torch.randn(2, 4)
    gm, _ = capture(model, x, torch.randn(2, 4))  # base(x) + B(A(y)): two inputs
    assert find_adapted(gm.graph.nodes) == {}
    torch._dynamo.reset()
    gm, _ = capture(model, x, x)  # Dynamo sees one input: base(x) + B(A(x)) * 0.5
    assert len(find_adapted(gm.graph.nodes)) == 1


def test_lora_with_a_cast_between_base_and_sum_keeps_the_cast_in_the_adapter():
    model = _HandWritten(lambda m, x: m.base(x).to(torch.float64) + m.b(m.a(x)) * 0.5)
    gm, _ = capture(model, torch.randn(2, 4))
    ((_, (base, parts)),) = find_adapted(gm.graph.nodes).items()
    assert [u.target for u in base.users] == ["to"] and next(iter(base.users)) in parts


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_lora_changed_between_generations(compiler):
    """diffusers' adapter API on a transformed model: a new scale, disabling, fusing and a
    second adapter each take effect from the next generation, equal to the reference."""
    case = make("sd3")  # two blocks: the adaLN Linears are batched over stacked weights
    model = case.model
    linears = _linears(model)
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=linears,
                                 init_lora_weights=False))

    def second_adapter():
        model.unfuse_lora()
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=linears[-6:],
                                     init_lora_weights=False), adapter_name="second")
        model.set_adapters(["default", "second"], weights=[1.0, 0.5])

    changes = {
        "scale": lambda: model.set_adapters(["default"], weights=[0.3]),
        "disable": model.disable_lora,
        "fuse": lambda: (model.enable_lora(), model.fuse_lora(lora_scale=1.0)),
        "second adapter": second_adapter,
    }
    fast = fora_fx.transform(model, interval=3, num_steps=STEPS, compiler=compiler)
    before = _run(fast, case)
    for what, change in changes.items():
        change()
        got = _run(fast, case)  # num_steps: the next generation
        ref = EagerFora(model, case.sites, interval=3, num_steps=STEPS)
        expected = _run(ref, case)
        ref.remove()
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=what)
        assert not torch.allclose(got[-1], before[-1]), what  # the change took effect
        before = got
    fora_fx.restore(fast)


def test_load_lora_weights_on_a_transformed_pipeline():
    """diffusers' `pipe.load_lora_weights` on a transformed pipeline reaches the original
    transformer; the sites stay, and the pipeline equals the eager reference with the LoRA."""
    from pipes import make_pipe, output_tensor

    from peft.utils import get_peft_model_state_dict
    from reference_pipeline import PipelineEagerFora

    case = make_pipe("flux")
    donor = copy.deepcopy(case.pipe.transformer)  # a LoRA in diffusers' state-dict format
    torch.manual_seed(5)
    donor.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=_linears(donor),
                                 init_lora_weights=False))
    lora = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(donor).items()}

    def run(pipe):
        with torch.no_grad():
            return [output_tensor(pipe(**case.call(seed))) for seed in (0, 1)]

    pipe = fora_fx.transform(case.pipe, interval=3, compiler="eager")
    before = run(pipe)
    sites = [s.module_path for s in fora_fx.explain(pipe).sites]
    pipe.load_lora_weights(lora)
    got = run(pipe)
    pairs = pipe.transformer._fora.pairs  # the graph before the LoRA, and with it
    assert len(pairs) == 2 and sorted(s.module_path for s in pairs[1].sites) == sorted(sites)
    assert pairs[1].located.uncached == []
    fora_fx.restore(pipe)
    ref = PipelineEagerFora(case.pipe, case.sites, interval=3)
    expected = run(ref)
    ref.remove()
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], before[0])  # the LoRA took effect
