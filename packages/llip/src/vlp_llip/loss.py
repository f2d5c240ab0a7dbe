"""Llip's sigmoid loss over every (image i, caption j) pair, image i conditioned on caption j.

``s(i, j) = exp(logit_scale) * cos(z[i | q_j], zt_j) + b``; the loss of a rank is
``-sum_{i local, j global} logsigmoid(y_ij s(i, j)) / B_local`` with ``y_ii = +1`` and -1 elsewhere, so its
mean over ranks (DDP's gradient mean) is the single-process loss ``sum over all pairs / N``.

Memory: pairs are scored in blocks of ``chunk`` local images x ``chunk`` captions; each block is
recomputed in backward (``torch.utils.checkpoint``), so only one ``chunk x chunk x D`` block is alive at a
time and nothing of size ``B x B x D`` is ever built. The positives are scored separately per pair
(``-logsigmoid(s) = softplus(s) - s``: every block adds ``softplus`` of all its logits, the diagonal then
subtracts ``s(i, i)``), so the blocks need no labels at all.

Across ranks only the text side travels: (query, target) of every rank go around a ring of neighbour
exchanges with gradient (the core's SigLIP collectives) while keys and values stay on their rank.

Shape legend:
    B: per-rank batch, N = W*B: global batch, H: heads, K: mixture tokens, d: D / H, D: embedding dim,
    X: packed text width (H*d + D).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp_core.distributed.collectives import neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad
from vlp_core.distributed.utils import get_rank, get_world_size
from vlp_core.losses import clamp_bounds_, declare_bounds, log_scale_bounds, normalize_features, siglip_loss
from vlp_core.method import LossOutput
from vlp_llip.config import LlipConfig
from vlp_llip.xattn import conditioned_cosines, paired_embeddings

__all__ = ["LlipLoss", "llip_loss", "ring_blocks"]

_RINGS = ("bidir", "shift")


def ring_blocks(x_BX: torch.Tensor, ring: str = "bidir") -> Iterator[torch.Tensor]:
    """Every other rank's ``x_BX`` once, passed around a ring with gradient (nothing without a group).

    ``bidir`` sends both ways at once (ceil((W-1)/2) rounds), ``shift`` one way (W-1 rounds).
    """
    world, rank = get_world_size(), get_rank()
    right, left = (rank + 1) % world, (rank - 1) % world
    if world == 1:
        return
    if ring == "shift":
        block_BX = x_BX
        for _ in range(world - 1):
            block_BX = neighbour_exchange_with_grad(block_BX, to_rank=right, from_rank=left)
            yield block_BX
        return
    # After k bidirectional rounds we hold the blocks of ranks r-k and r+k; if W-1 is odd the one of rank
    # r + W/2 is left over and comes by one extra rightward hop.
    to_left_BX = to_right_BX = x_BX
    n_bidir, remainder = divmod(world - 1, 2)
    for _ in range(n_bidir):
        from_left_BX, from_right_BX = neighbour_exchange_bidir_with_grad(
            to_left_BX, to_right_BX, left_rank=left, right_rank=right)
        yield from_left_BX
        yield from_right_BX
        to_right_BX, to_left_BX = from_left_BX, from_right_BX
    if remainder:
        yield neighbour_exchange_with_grad(to_right_BX, to_rank=right, from_rank=left)


def _block_softplus(keys_VHKd: torch.Tensor, values_VHKD: torch.Tensor, query_THd: torch.Tensor,
                    target_TD: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum softplus(s(v, t))`` over one block (what every pair contributes as a negative)."""
    logits_VT = scale * conditioned_cosines(keys_VHKd, values_VHKD, query_THd, target_TD, tau) + bias
    return F.softplus(logits_VT).sum()


def _negatives(keys_BHKd: torch.Tensor, values_BHKD: torch.Tensor, query_BHd: torch.Tensor,
               target_BD: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *, tau: float, chunk: int,
               use_checkpoint: bool) -> torch.Tensor:
    """``sum softplus`` over all (local image, text) pairs, in checkpointed ``chunk x chunk`` blocks."""
    total = torch.zeros((), dtype=scale.dtype, device=scale.device)
    recompute = use_checkpoint and torch.is_grad_enabled()
    for v0 in range(0, keys_BHKd.shape[0], chunk):
        k_blk, u_blk = keys_BHKd[v0:v0 + chunk], values_BHKD[v0:v0 + chunk]
        for t0 in range(0, query_BHd.shape[0], chunk):
            args = (k_blk, u_blk, query_BHd[t0:t0 + chunk], target_BD[t0:t0 + chunk], scale, bias, tau)
            if recompute:
                total = total + checkpoint(_block_softplus, *args, use_reentrant=False)
            else:
                total = total + _block_softplus(*args)
    return total


def llip_loss(
    keys_BHKd: torch.Tensor,
    values_BHKD: torch.Tensor,
    query_BHd: torch.Tensor,
    target_BD: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    tau: float,
    chunk: int = 128,
    ring: str = "bidir",
    use_checkpoint: bool = True,
) -> torch.Tensor:
    """Llip's sigmoid loss for this rank's images against the global batch of captions.

    Args:
        keys_BHKd: This rank's image keys.
        values_BHKD: This rank's image values with the output projection folded in.
        query_BHd: This rank's caption queries (row b pairs with image b).
        target_BD: This rank's caption targets (normalised inside).
        logit_scale: Scalar log-space scale (already clamped by the caller).
        logit_bias: Scalar bias.
        tau: Cross-attention temperature.
        chunk: Side of the image x caption blocks.
        ring: ``"bidir"`` or ``"shift"`` exchange of the text tensors between ranks.
        use_checkpoint: Recompute each block in backward (memory ~ one block instead of all of them).

    Returns:
        Scalar ``-sum_{i local, j global} logsigmoid(y_ij s(i, j)) / B``.
    """
    if ring not in _RINGS:
        raise ValueError(f"ring must be one of {_RINGS}, got {ring!r}")
    B, H, K, d = keys_BHKd.shape
    if values_BHKD.shape[:3] != (B, H, K) or query_BHd.shape != (B, H, d) or target_BD.shape != (B, H * d):
        raise ValueError(
            f"llip_loss: inconsistent shapes keys {tuple(keys_BHKd.shape)}, values {tuple(values_BHKD.shape)}, "
            f"query {tuple(query_BHd.shape)}, target {tuple(target_BD.shape)}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    dtype = torch.promote_types(values_BHKD.dtype, torch.float32)
    target_BD = normalize_features(target_BD)
    scale, bias = logit_scale.exp().to(dtype), logit_bias.to(dtype)
    common: dict[str, Any] = {"tau": tau, "chunk": chunk, "use_checkpoint": use_checkpoint}

    z_BD = normalize_features(paired_embeddings(keys_BHKd, values_BHKD, query_BHd, tau))
    positives = scale * (z_BD * target_BD).sum() + bias * B
    total = _negatives(keys_BHKd, values_BHKD, query_BHd, target_BD, scale, bias, **common) - positives
    # Pack (query, target) into one tensor so one exchange per hop carries both (and both gradients back).
    text_BX = torch.cat([query_BHd.reshape(B, H * d).to(dtype), target_BD], dim=1)
    for block_BX in ring_blocks(text_BX, ring):
        q_BHd, t_BD = block_BX[:, :H * d].view(B, H, d), block_BX[:, H * d:]
        total = total + _negatives(keys_BHKd, values_BHKD, q_BHd, t_BD, scale, bias, **common)
    return total / B


class LlipLoss(nn.Module):
    """Learnable logit scale (init ln(1/0.07), clamped to [0, ln(max_logit_scale)]) and bias (init -10).

    Llip features (``image_keys`` ...) get :func:`llip_loss`; the factorised variants' ``image_features`` /
    ``text_features`` get the core's SigLIP loss with the same scale and bias.
    """

    def __init__(self, cfg: LlipConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_bias)))
        # Floats: no tensor (works on the meta device). The scale is clamped to [0, ln max] after every step
        # (the official loop); the bias is left unbounded, as there.
        lower, self.max_log_scale = log_scale_bounds(cfg.max_logit_scale, key="loss.max_logit_scale")
        declare_bounds(self, logit_scale=(lower, self.max_log_scale))

    def clamped_scale(self) -> torch.Tensor:
        """``logit_scale`` clamped to ``[0, ln max]`` on the device: no gradient past the bounds (but at them)."""
        return torch.clamp(self.logit_scale, min=0.0, max=self.max_log_scale)

    def after_step(self, finite: torch.Tensor) -> None:
        """After each optimizer step: the stored logit scale back into ``[0, ln max_logit_scale]``."""
        clamp_bounds_(self)

    def forward(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> LossOutput:
        c = self.cfg
        scale = self.clamped_scale()
        if "image_keys" in features:
            loss = llip_loss(features["image_keys"], features["image_values"], features["text_query"],
                             features["text_target"], scale, self.logit_bias, tau=c.tau, chunk=c.chunk,
                             ring=c.ring, use_checkpoint=c.checkpoint_blocks)
        else:
            loss = siglip_loss(features["image_features"], features["text_features"], scale, self.logit_bias,
                               ring=c.ring)
        parts = {"loss_contrastive": loss.detach(), "logit_scale": scale.detach().exp(),
                 "logit_bias": self.logit_bias.detach().clone()}
        return LossOutput(loss, parts)
