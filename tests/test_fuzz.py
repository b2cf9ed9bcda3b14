"""Differential fuzzing on random DiTs that build tables at run time (tests/fuzz_models.py).

Every generated model, over two generations (at two latent sizes where its position table
allows): `interval=1` equals the untransformed model and `interval=N` equals the eager
hook-based FORA reference, with the batch pass on and off, through the eager compiler and
through Inductor (the default path). `test_fuzzer_exercised_every_feature` checks that the
examples hypothesis drew (derandomized: the same every run) cover every feature.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from fuzz_models import POS, ROPE, TABLE, FuzzDiT, Recipe, inputs, recipes
from hypothesis import given, settings
from reference import EagerFora

import fora_fx

# One worker for all of this file (tests/run.sh): its tests share state.
pytestmark = pytest.mark.xdist_group("fuzz")

SEEN: Counter[str] = Counter()
STEPS = 4


def _generations(model, recipe: Recipe, reset) -> list[torch.Tensor]:
    outs = []
    for size in recipe.sizes:
        reset()
        with torch.no_grad():
            outs += [model(*inputs(k, size, recipe.seed)) for k in range(STEPS)]
    return outs


def _check(recipe: Recipe, tol: float, **options) -> None:
    model = FuzzDiT(recipe).eval()
    plain = _generations(model, recipe, lambda: None)
    ref = EagerFora(model, model.site_paths(), interval=recipe.interval)
    reused = _generations(ref, recipe, ref.reset)
    ref.remove()
    for interval, expected in ((1, plain), (recipe.interval, reused)):
        fast = fora_fx.transform(model, interval=interval, **options)
        got = _generations(fast, recipe, lambda f=fast: fora_fx.reset(f))
        assert [s.module_path for s in fora_fx.explain(fast).sites] == model.site_paths()
        fora_fx.restore(fast)
        for k, (g, e) in enumerate(zip(got, expected, strict=True)):
            torch.testing.assert_close(
                g, e, rtol=tol, atol=tol,
                msg=lambda m, k=k, i=interval: f"{recipe} interval={i} call {k}: {m}")


@settings(max_examples=10)
@given(recipe=recipes())
def test_generated_models_are_exact_through_the_eager_compiler(recipe):
    SEEN.update(recipe.features())
    SEEN["examples"] += 1
    for batch_blocks in (True, False):
        with fora_fx.tuning.patch(batch_blocks=batch_blocks):
            _check(recipe, 1e-5, compiler="eager")


@settings(max_examples=3)
@given(recipe=recipes(min_depth=2, max_depth=2, resize=True))  # the batch pass has a run
def test_generated_models_are_exact_through_inductor(recipe):
    SEEN.update(f"inductor:{f}" for f in recipe.features())
    _check(recipe, 1e-4)  # the default path: Inductor, blocks batched


def test_fuzzer_exercised_every_feature():
    """Runs after the two tests above (file order); fails if the drawn examples stopped
    covering a feature the generator offers."""
    wanted = [f"pos={p}" for p in POS] + [f"rope={r}" for r in ROPE] + [
        f"block_table={t}" for t in TABLE] + ["pos_inplace=True", "pos_inplace=False",
                                              "resolution_change"]
    if not SEEN["examples"]:
        import pytest

        pytest.skip("the fuzz tests did not run in this session")
    print("\nfuzzer feature counts:", dict(sorted(SEEN.items())))
    missing = [f for f in wanted if not SEEN[f]]
    assert not missing, f"no generated model exercised {missing}: {dict(SEEN)}"
