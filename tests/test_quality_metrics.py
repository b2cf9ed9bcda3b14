"""The quality metrics on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fora_fx.quality.metrics import class_accuracy, fid, inception_score, precision_recall, psnr


def _gauss(n, d, mean=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(mean, scale, size=(n, d))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    a = _gauss(500, 8)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-8)
    near, far = fid(a, _gauss(500, 8, seed=1)), fid(a, _gauss(500, 8, mean=2.0, seed=1))
    assert near < 0.5 < far
    # Gaussians with equal covariance: FID = |mu_a - mu_b|^2 (here 8 * 2^2), up to sampling
    assert far == pytest.approx(32.0, rel=0.1)


def test_fid_matches_closed_form_for_scaled_isotropic_gaussians():
    # N(0, I) vs N(0, 4I) in d dims: d * (1 + 4 - 2*2) = d
    a, b = _gauss(20000, 4), _gauss(20000, 4, scale=2.0, seed=3)
    assert fid(a, b) == pytest.approx(4.0, rel=0.05)


def test_inception_score_bounds():
    uniform = np.full((100, 10), 0.1)
    assert inception_score(uniform) == pytest.approx(1.0)
    confident_balanced = np.eye(10)[np.arange(100) % 10]
    assert inception_score(confident_balanced) == pytest.approx(10.0, rel=1e-6)
    confident_collapsed = np.eye(10)[np.zeros(100, dtype=int)]
    assert inception_score(confident_collapsed) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="rows sum to 1"):
        inception_score(np.ones((3, 10)))


def test_precision_recall_on_separated_and_nested_clusters():
    real = _gauss(300, 2)
    assert precision_recall(real, _gauss(300, 2, mean=50.0, seed=1)) == (0.0, 0.0)
    p, r = precision_recall(real, _gauss(300, 2, seed=2))
    assert p > 0.9 and r > 0.9
    # Generated samples collapsed onto a small part of the real data: precise, low recall.
    p, r = precision_recall(real, _gauss(300, 2, scale=0.05, seed=4))
    assert p > 0.95 and r < 0.3


def test_psnr_and_accuracy():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[1] += 0.2  # mse 0.04 with range 2 -> 10*log10(4/0.04) = 20 dB
    out = psnr(a, b)
    assert torch.isinf(out[0]) and out[1].item() == pytest.approx(20.0)
    assert class_accuracy(np.eye(3), [0, 1, 1]) == pytest.approx(2 / 3)


def test_classifier_features_separate_real_from_noise():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fora_fx.quality.classifier import train_classifier

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8 - 1  # [N, 1, 8, 8] in [-1, 1]
    y = torch.tensor(d.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    clf = train_classifier(x_tr, y_tr, seed=0)
    again = train_classifier(x_tr, y_tr, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(clf.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    with torch.no_grad():
        assert class_accuracy(clf.probs(x_te), y_te) > 0.95
        f_tr = clf.features(x_tr)
        real = fid(f_tr, clf.features(x_te))
        noise = fid(f_tr, clf.features(torch.rand(len(x_te), 1, 8, 8) * 2 - 1))
        assert real * 50 < noise  # held-out real vs train << noise vs train
        assert inception_score(clf.probs(x_te)) > 8.5  # confident, balanced on real digits
