"""Feed-forward layers.

Shape legend:
    B: batch, L: length, D: model width, F: hidden width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Mlp", "QuickGELU", "make_act"]


class QuickGELU(nn.Module):
    """OpenAI CLIP's ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """``"gelu"`` (exact), ``"gelu_tanh"`` (tanh approximation: SigLIP's gelu_pytorch_tanh) or ``"quick_gelu"``."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}: expected 'gelu', 'gelu_tanh' or 'quick_gelu'")


class Mlp(nn.Module):
    """Two-layer MLP, ``fc2(act(fc1(x)))``.

    Args:
        dim: Input and output width D.
        hidden_dim: Hidden width F.
        drop: Dropout after the output projection.
        act: Activation name (see :func:`make_act`).
    """

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0, act: str = "gelu") -> None:
        super().__init__()
        if hidden_dim <= 0:
            raise ValueError(f"MLP hidden width must be positive, got {hidden_dim}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Apply the MLP to the last dimension: [..., D] -> [..., D]."""
        h_BLF = self.act(self.fc1(x_BLD))
        return self.drop(self.fc2(h_BLF))
