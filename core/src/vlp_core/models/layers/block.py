"""Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

Shape legend:
    B: batch, L: length, D: model width.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlp_core.models.layers.attention import Attention
from vlp_core.models.layers.mlp import Mlp

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm self-attention block.

    Args:
        dim: Model width D.
        heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        qkv_bias: Bias on the fused QKV projection.
        act: MLP activation (``"gelu"``, ``"gelu_tanh"``, ``"quick_gelu"``).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self, dim: int, heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True, act: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), act=act)

    def forward(self, x_BLD: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """[B, L, D] -> [B, L, D]; ``attn_mask``/``is_causal`` as in :class:`Attention`."""
        x_BLD = x_BLD + self.attn(self.ln_1(x_BLD), attn_mask=attn_mask, is_causal=is_causal)
        return x_BLD + self.mlp(self.ln_2(x_BLD))
