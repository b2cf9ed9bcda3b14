"""scikit-learn's handwritten digits as a tiny image data set for the quality DiT.

Resolution choice: the native 8x8 grid, fed to the DiT with ``patch_size=1`` (64 tokens, one per
pixel). The digits are 8x8 at the source, so upsampling (16x16 bilinear, patch 2) would add no
information -- it yields the same 64 tokens, just with each token regressing four interpolated
pixels -- while 8x8 / patch 2 (16 tokens of 2x2 pixels) is too coarse for attention to have
much to do. 64 one-pixel tokens keeps the sequence long enough for attention/MLP to matter
(which is what FORA caches), trains well on 2 CPU cores, and the samples are exactly comparable
with the data.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 8
NUM_CLASSES = 10
TEST_FRACTION = 0.2
_GREY_LEVELS = 16.0  # pixel values are integers 0..16


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] back to [0, 1] (for display / metrics)."""
    return ((images.clamp(-1.0, 1.0) + 1.0) / 2.0).to(torch.float32)


def load_digits_split(
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1,797 digits as float32 ``[N, 1, 8, 8]`` in [-1, 1] and int64 labels 0..9.

    Returns ``(train_x, train_y, test_x, test_y)``: a deterministic, class-stratified 80/20 split
    (``train_test_split(stratify=y, random_state=seed)``).
    """
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)  # [N, 8, 8], 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    x = images / _GREY_LEVELS * 2.0 - 1.0
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    train_idx = np.sort(train_idx)
    test_idx = np.sort(test_idx)

    def pick(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.from_numpy(np.ascontiguousarray(x[ids])).unsqueeze(1)
        ys = torch.from_numpy(np.ascontiguousarray(labels[ids]))
        return xs, ys

    train_x, train_y = pick(train_idx)
    test_x, test_y = pick(test_idx)
    return train_x, train_y, test_x, test_y
