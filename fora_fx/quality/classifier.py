"""The digits classifier whose features define FID / IS / precision / recall here.

Inception-v3 features mean nothing on 8x8 digits, so the metrics use a small MLP trained
(deterministically, in about a second on CPU) on the same training split the DiT saw:
input average-pooled to 8x8 (any resolution the DiT samples at), 64 -> 256 -> 64 -> 10,
features = the 64 post-ReLU activations before the last layer, probabilities = softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, 1, H, W] in [-1, 1] -> [N, 64]
        x = F.adaptive_avg_pool2d(x.float(), 8).flatten(1)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).softmax(-1)


def train_classifier(x: torch.Tensor, y: torch.Tensor, seed: int = 0,
                     steps: int = 600) -> DigitsClassifier:
    """Adam on minibatches of 128 with small noise augmentation; deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=g)
        xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
