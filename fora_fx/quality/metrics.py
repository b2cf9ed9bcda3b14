"""Sample-quality metrics on feature vectors / class probabilities (numpy, float64).

* FID: Fréchet distance between Gaussians fit to two feature sets (Heusel et al. 2017).
* Inception Score: exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016); 1 for a classifier
  that says nothing, the number of classes for confident, balanced predictions.
* Precision / recall: k-NN manifolds (Kynkäänniemi et al. 2019): precision is the fraction of
  generated samples inside the real manifold (within some real sample's k-NN radius), recall
  the fraction of real samples inside the generated one.
* PSNR: per-sample deviation between two images with the same seeds (FORA vs uncached).
Features come from the digits classifier (fora_fx/quality/classifier.py), not Inception.
"""

from __future__ import annotations

import numpy as np
import torch


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def fid(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between feature sets a [N, D] and b [M, D]."""
    a, b = _np(a), _np(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"fid expects two [N, D] feature sets with N >= 2, got {a.shape} and {b.shape}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((cov_a cov_b)^1/2) = Tr((s cov_b s)^1/2) with s = cov_a^1/2: symmetric, so eigh is exact.
    s = _sqrtm_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s @ cov_b @ s), 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(value, 0.0)


def inception_score(probs: np.ndarray | torch.Tensor, eps: float = 1e-12) -> float:
    """IS of class probabilities [N, C] (rows sum to 1)."""
    p = _np(probs)
    if p.ndim != 2 or not np.allclose(p.sum(1), 1, atol=1e-4):
        raise ValueError("inception_score expects probabilities [N, C] whose rows sum to 1")
    marginal = p.mean(0, keepdims=True)
    kl = (p * (np.log(p + eps) - np.log(marginal + eps))).sum(1)
    return float(np.exp(kl.mean()))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d, 0, None))


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                     k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall of generated features `fake` against `real`."""
    r, f = _np(real), _np(fake)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision_recall needs more than k={k} samples in each set")
    r_radii, f_radii = _knn_radii(r, k), _knn_radii(f, k)
    d = _pairwise(f, r)  # [F, R]
    precision = float((d <= r_radii[None, :]).any(1).mean())
    recall = float((d.T <= f_radii[None, :]).any(1).mean())
    return precision, recall


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB between image batches in [-1, 1] (data_range 2); inf if equal."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def class_accuracy(probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    return float((_np(probs).argmax(1) == _np(labels)).mean())
