"""The digits DiT used for quality evaluation: data split, model size, deterministic training,
and the committed weights being a real denoiser."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fora_fx.quality.data import load_digits_split
from fora_fx.quality.model import (
    MODEL_CONFIG,
    NULL_CLASS,
    WEIGHTS_PATH,
    build_model,
    load_trained,
    param_bytes,
)
from fora_fx.quality.train import NUM_TRAIN_TIMESTEPS, TrainConfig, eps_mse, train

# One worker for all of this file (tests/run.sh): its tests share state.
pytestmark = pytest.mark.xdist_group("quality_train")


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_split_deterministic_stratified_disjoint():
    train_x, train_y, test_x, test_y = load_digits_split(0)
    again = load_digits_split(0)
    for a, b in zip((train_x, train_y, test_x, test_y), again, strict=True):
        assert torch.equal(a, b)
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_x.dtype == torch.float32 and train_y.dtype == torch.int64
    assert float(train_x.min()) == -1.0 and float(train_x.max()) == 1.0
    # sklearn's digits have no duplicate images, so rows identify samples: a partition.
    assert not _rows(train_x) & _rows(test_x)
    assert len(_rows(train_x) | _rows(test_x)) == 1797
    counts_train = torch.bincount(train_y, minlength=10)
    counts_test = torch.bincount(test_y, minlength=10)
    expected = 0.2 * (counts_train + counts_test).double()
    assert ((counts_test.double() - expected).abs() <= 1.0).all()
    assert not torch.equal(load_digits_split(1)[3], test_y)  # the seed matters


def test_model_size_and_null_class():
    model = build_model()
    assert param_bytes(model) <= 10 * 1000 * 1000
    assert MODEL_CONFIG["in_channels"] == MODEL_CONFIG["out_channels"] == 1
    model.eval()
    x = torch.zeros(2, 1, 8, 8)
    t = torch.tensor([10, 900])
    out = model(x, timestep=t, class_labels=torch.tensor([3, NULL_CLASS])).sample
    assert out.shape == x.shape


def test_three_step_training_is_bit_identical(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=32, warmup_steps=2, log_every=1000, evaluate=False)
    rec_a = train(cfg, tmp_path / "a" / "w.safetensors", command="test")
    rec_b = train(cfg, tmp_path / "b" / "w.safetensors", command="test")
    bytes_a = (tmp_path / "a" / "w.safetensors").read_bytes()
    assert bytes_a == (tmp_path / "b" / "w.safetensors").read_bytes()
    assert rec_a["sha256"] == rec_b["sha256"] and rec_a["final_loss"] == rec_b["final_loss"]
    meta = json.loads((tmp_path / "a" / "w.json").read_text())
    assert meta["steps"] == 3 and meta["seed"] == 0 and meta["model_config"] == MODEL_CONFIG
    cfg_c = TrainConfig(steps=3, batch_size=32, seed=1, log_every=1000, evaluate=False)
    rec_c = train(cfg_c, tmp_path / "c" / "w.safetensors")
    assert rec_c["sha256"] != rec_a["sha256"]


@pytest.fixture(scope="module")
def trained():
    return load_trained()


def test_committed_weights_load(trained):
    state = load_file(str(WEIGHTS_PATH))
    assert set(state) == set(trained.state_dict())
    assert not trained.training
    meta = json.loads(WEIGHTS_PATH.with_suffix(".json").read_text())
    assert meta["model_config"] == MODEL_CONFIG and meta["sha256"]


def test_trained_model_denoises_held_out_digits(trained):
    _, _, test_x, test_y = load_digits_split(0)
    t = torch.full((len(test_x),), NUM_TRAIN_TIMESTEPS // 2, dtype=torch.long)
    cond = eps_mse(trained, test_x, test_y, t, torch.Generator().manual_seed(0))
    uncond = eps_mse(trained, test_x, torch.full_like(test_y, NULL_CLASS), t,
                     torch.Generator().manual_seed(0))
    # Predicting zeros scores 1.0. Measured on the committed weights: 0.0138 with the labels,
    # 0.0229 with NULL_CLASS (at t=50: 0.34 / 0.38; t=200: 0.12 / 0.18).
    assert cond < 0.05
    assert uncond < 0.1
    assert cond < uncond  # the labels carry information
