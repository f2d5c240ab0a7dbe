"""Feed-forward layers.

Shape legend:
    B: batch, L: length, D: model width, F: hidden width.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Two-layer GELU MLP, ``fc2(act(fc1(x)))``.

    Args:
        dim: Input and output width D.
        hidden_dim: Hidden width F.
        drop: Dropout after the output projection.
    """

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0) -> None:
        super().__init__()
        if hidden_dim <= 0:
            raise ValueError(f"MLP hidden width must be positive, got {hidden_dim}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x_BLD: Tensor) -> Tensor:
        """Apply the MLP to the last dimension: [..., D] -> [..., D]."""
        h_BLF = self.act(self.fc1(x_BLD))
        return self.drop(self.fc2(h_BLF))
