"""Multi-head attention layers on ``F.scaled_dot_product_attention``.

Shape legend:
    B: batch, L: query length, S: key/value length, D: model width, H: heads, K: head dim (D / H).

Masks are boolean (True = may attend) or absent, never additive float masks: a causal pass without a mask
goes through ``is_causal=True``, which keeps the flash / memory-efficient kernels eligible on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "CrossAttention", "padding_to_attn_mask"]


def padding_to_attn_mask(attention_mask_BS: Tensor, *, causal: bool, query_len: int | None = None) -> Tensor:
    """Boolean SDPA mask from a key-padding mask (True = real token).

    Args:
        attention_mask_BS: [B, S] True where the key is a real token.
        causal: Also forbid attending to later positions (needs query_len == S).
        query_len: Number of queries L; defaults to S.

    Returns:
        [B, 1, 1, S] (non-causal) or [B, 1, L, S] (causal) boolean mask, broadcastable over heads.
    """
    mask_BS = attention_mask_BS.bool()
    # A sequence with no real token would give an all-False row and NaN softmax; let it attend everywhere
    # instead (its outputs are meaningless but finite, and they never reach a real token).
    mask_BS = mask_BS | ~mask_BS.any(dim=1, keepdim=True)
    if not causal:
        return mask_BS[:, None, None, :]
    S = mask_BS.shape[1]
    L = S if query_len is None else query_len
    if L != S:
        raise ValueError(f"a causal padding mask needs as many queries as keys, got {L} and {S}")
    causal_LS = torch.ones(L, S, dtype=torch.bool, device=mask_BS.device).tril()
    eye_LS = torch.eye(L, S, dtype=torch.bool, device=mask_BS.device)
    # Each query may always see itself: a left-padded query would otherwise have no visible key (NaN).
    # Rows of real tokens are unchanged because their diagonal key is real anyway.
    mask_BLS = (causal_LS[None] & mask_BS[:, None, :]) | eye_LS[None]
    return mask_BLS[:, None]


class Attention(nn.Module):
    """Self-attention with a fused QKV projection.

    Args:
        dim: Model width D.
        heads: Number of heads H (must divide D).
        qkv_bias: Bias on the QKV projection.
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self, dim: int, heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x_BLD: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """Attend.

        Args:
            x_BLD: [B, L, D] input.
            attn_mask: Boolean mask broadcastable to [B, H, L, L] (True = attend), e.g. from
                :func:`padding_to_attn_mask`. Exclusive with ``is_causal``.
            is_causal: Causal attention through SDPA's own flag (flash-eligible).

        Returns:
            [B, L, D] output.
        """
        if attn_mask is not None and is_causal:
            raise ValueError("pass either attn_mask or is_causal; fold causality into the mask to combine")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be boolean (True = attend), got {attn_mask.dtype}")
        B, L, D = x_BLD.shape
        qkv_B3HLK = self.qkv(x_BLD).view(B, L, 3, self.heads, self.head_dim).permute(0, 2, 3, 1, 4)
        q_BHLK, k_BHLK, v_BHLK = qkv_B3HLK.unbind(1)
        o_BHLK = F.scaled_dot_product_attention(
            q_BHLK,
            k_BHLK,
            v_BHLK,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal,
        )
        o_BLD = o_BHLK.transpose(1, 2).reshape(B, L, D)
        return self.proj_drop(self.proj(o_BLD))


class CrossAttention(nn.Module):
    """Queries from one sequence attend to keys/values from another (fused KV projection).

    Args:
        dim: Query width D (also the output width).
        heads: Number of heads H (must divide D).
        kv_dim: Width of the key/value input; defaults to ``dim``.
        qkv_bias: Bias on the Q and KV projections.
    """

    def __init__(self, dim: int, heads: int, *, kv_dim: int | None = None, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads {heads}")
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(kv_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: Tensor, ctx_BSE: Tensor, *, attn_mask: Tensor | None = None) -> Tensor:
        """Attend from ``x_BLD`` to ``ctx_BSE``.

        Args:
            x_BLD: [B, L, D] queries.
            ctx_BSE: [B, S, E] context (E = kv_dim).
            attn_mask: Boolean mask broadcastable to [B, H, L, S] (True = attend).

        Returns:
            [B, L, D] output.
        """
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be boolean (True = attend), got {attn_mask.dtype}")
        B, L, D = x_BLD.shape
        S = ctx_BSE.shape[1]
        q_BHLK = self.q(x_BLD).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        kv_B2HSK = self.kv(ctx_BSE).view(B, S, 2, self.heads, self.head_dim).permute(0, 2, 3, 1, 4)
        k_BHSK, v_BHSK = kv_B2HSK.unbind(1)
        o_BHLK = F.scaled_dot_product_attention(q_BHLK, k_BHSK, v_BHSK, attn_mask=attn_mask)
        return self.proj(o_BHLK.transpose(1, 2).reshape(B, L, D))
