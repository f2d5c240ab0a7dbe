"""Llip's text-conditioned pooling of the K mixture tokens, as plain functions on per-head tensors.

One query per caption attends over one image's K mixture tokens, separately per head; the softmax runs over
the K tokens for every (image, caption, head). Scores are divided by ``tau`` only (no ``1/sqrt(d)``).

The output projection is linear, so it can be folded into the values once per image:
``U[h, k] = V[h, k] @ W_o[h*d:(h+1)*d, :]`` and ``z[v, t] = sum_{h,k} a[v, t, h, k] U_v[h, k]``. That costs
``H*K*D`` per (image, caption) pair instead of ``K*D + D*D`` (about 2x less at B/16's sizes) and gives the same
embeddings up to rounding.

Shape legend:
    V: images, T: captions, B: paired items (image b with caption b), H: heads, K: mixture tokens,
    d: head dim (D / H), D: embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "mixture_weights",
    "fold_out_proj",
    "conditioned_embeddings",
    "conditioned_embeddings_unfolded",
    "conditioned_cosines",
    "paired_embeddings",
]


def mixture_weights(keys_VHKd: torch.Tensor, query_THd: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax weights over the K tokens of every image for every caption and head: float32+ ``[V, T, H, K]``."""
    # Dividing the (small) queries instead of the [V, T, H, K] scores: same values, one pass less.
    scores_VTHK = torch.einsum("vhkd,thd->vthk", keys_VHKd, query_THd / tau)
    # Softmax in at least float32 (under bf16 autocast the einsum comes out in bf16).
    return torch.softmax(scores_VTHK.to(torch.promote_types(scores_VTHK.dtype, torch.float32)), dim=-1)


def fold_out_proj(values_BHKd: torch.Tensor, out_weight_DD: torch.Tensor) -> torch.Tensor:
    """Fold the output projection (a ``nn.Linear`` weight, ``[D_out, D_in]``) into the values: ``[B, H, K, D]``."""
    _, H, _, d = values_BHKd.shape
    w_HdD = out_weight_DD.T.reshape(H, d, out_weight_DD.shape[0])
    return torch.einsum("bhkd,hde->bhke", values_BHKd, w_HdD)


def conditioned_embeddings(
    keys_VHKd: torch.Tensor, folded_VHKD: torch.Tensor, query_THd: torch.Tensor, tau: float
) -> torch.Tensor:
    """Every image mixed by every caption's query, with folded values: ``[V, T, D]`` (not normalised)."""
    a_VTHK = mixture_weights(keys_VHKd, query_THd, tau)
    V, T, H, K = a_VTHK.shape
    u_VMD = folded_VHKD.reshape(V, H * K, folded_VHKD.shape[-1])
    return torch.bmm(a_VTHK.reshape(V, T, H * K).to(u_VMD.dtype), u_VMD)


def conditioned_embeddings_unfolded(
    keys_VHKd: torch.Tensor,
    values_VHKd: torch.Tensor,
    query_THd: torch.Tensor,
    out_weight_DD: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """The same as :func:`conditioned_embeddings` the direct way: mix per head, concatenate, project."""
    a_VTHK = mixture_weights(keys_VHKd, query_THd, tau).to(values_VHKd.dtype)
    mixed_VTHd = torch.einsum("vthk,vhkd->vthd", a_VTHK, values_VHKd)
    return F.linear(mixed_VTHd.flatten(2), out_weight_DD)


def conditioned_cosines(
    keys_VHKd: torch.Tensor,
    folded_VHKD: torch.Tensor,
    query_THd: torch.Tensor,
    target_TD: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """``cos(z[v | q_t], target_t)`` for every image v and caption t: ``[V, T]``; ``target_TD`` is unit-norm.

    Materialises one ``[V, T, D]`` block; callers bound V and T (blocks of the loss, evaluation chunks).
    """
    z_VTD = conditioned_embeddings(keys_VHKd, folded_VHKD, query_THd, tau)
    z_VTD = F.normalize(z_VTD.to(torch.promote_types(z_VTD.dtype, torch.float32)), dim=-1)
    return torch.einsum("vtd,td->vt", z_VTD, target_TD.to(z_VTD.dtype))


def paired_embeddings(
    keys_BHKd: torch.Tensor, folded_BHKD: torch.Tensor, query_BHd: torch.Tensor, tau: float
) -> torch.Tensor:
    """Image b mixed by caption b's query only (the positives): ``[B, D]``, no B x B anything."""
    scores_BHK = torch.einsum("bhkd,bhd->bhk", keys_BHKd, query_BHd)
    a_BHK = torch.softmax(scores_BHK.to(torch.promote_types(scores_BHK.dtype, torch.float32)) / tau, dim=-1)
    return torch.einsum("bhk,bhke->be", a_BHK.to(folded_BHKD.dtype), folded_BHKD)
