"""A hand-computable model: every output is an exact small integer, so the FORA schedule is
checked by arithmetic, not by tolerance.

One block on a single token of width 1 (float64):
    h  = x * t                     # x = 1, so h = t
    a  = attn(h) = sdpa(h, h, h)   # one key: softmax = 1, so a = h exactly
    h1 = h + t * a                 # gate = current t (like adaLN-Zero gates)
    m  = mlp(h1) = fc2(relu(fc1(h1))), fc1 = fc2 = identity  ->  m = h1 for h1 > 0
    y  = h1 + m

Recompute at t:           y = 2 * (t + t*t)
Reuse at t, cache from r: y = t + t*r + (r + r*r)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ToyAttention(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [B, 1, 1, 1] = (B, heads, N, d)
        return F.scaled_dot_product_attention(h, h, h)


class ToyMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, 1, dtype=torch.float64)
        self.fc2 = nn.Linear(1, 1, dtype=torch.float64)
        for lin in (self.fc1, self.fc2):
            nn.init.ones_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(h)))


class Mlp16(nn.Module):
    """A 16 -> 32 -> 16 GELU MLP module: the feed-forward of the tests' hand-built blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = ToyAttention()
        self.mlp = ToyMlp()
        self.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: [B, 1, 1, 1] float64 ones; t: [B] float64 (the step's "timestep")
        t = t.view(-1, 1, 1, 1)
        h = x * t
        h1 = h + t * self.attn(h)
        return h1 + self.mlp(h1)


def recomputed(t: float) -> float:
    return 2 * (t + t * t)


def reused(t: float, r: float) -> float:
    return t + t * r + r + r * r


def inputs(t: float, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.ones(batch, 1, 1, 1, dtype=torch.float64)
    return x, torch.full((batch,), float(t), dtype=torch.float64)
