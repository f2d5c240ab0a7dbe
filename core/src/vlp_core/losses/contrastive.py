"""Contrastive image-text losses: InfoNCE (CLIP) and sigmoid (SigLIP), exact under data parallelism.

Both losses compute, on each rank, a *local* loss whose mean over ranks equals the single-process loss on
the global batch, and whose gradient (with the collectives' backward routing other ranks' contributions
back, then DDP's gradient mean) is the exact global gradient. Per-rank memory is O(B*N), never O(N^2).

- InfoNCE: local rows vs gathered columns (OpenCLIP ``local_loss=True, gather_with_grad=True``).
- SigLIP: local images vs local texts, then vs every other rank's text block passed around a ring
  (only text features travel; image features stay put).

Requirement: equal per-rank batch B on all ranks (see :mod:`vlp_core.distributed.collectives`).

Temperatures are stored in log space (``logit_scale = log(1/T)``); the functional forms take that log-space
value too, so ``module(x) == functional(x, module.logit_scale)`` whenever no clamping is active. The modules
clamp the stored scale to ``[0, ln max_logit_scale]`` in ``after_step`` (:mod:`vlp_core.losses.bounds`).

Tensor-name legend:
    B: per-rank batch, W: world size, N = W*B: global batch, D: embedding dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed.collectives import (
    all_gather_with_grad,
    neighbour_exchange_bidir_with_grad,
    neighbour_exchange_with_grad,
)
from vlp_core.distributed.utils import get_rank, get_world_size
from vlp_core.losses.bounds import clamp_bounds_, declare_bounds, log_scale_bounds
from vlp_core.method import LossOutput

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "normalize_features"]

_RINGS = ("bidir", "shift")


def normalize_features(x_BD: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in at least fp32 (bf16/fp16 norms lose too many bits; float64 stays float64)."""
    return F.normalize(x_BD.to(torch.promote_types(x_BD.dtype, torch.float32)), dim=-1)


def _check_pair(img_BD: torch.Tensor, txt_BD: torch.Tensor) -> None:
    if img_BD.ndim != 2 or img_BD.shape != txt_BD.shape:
        raise ValueError(
            f"expected image and text features of the same [B, D] shape, got {tuple(img_BD.shape)} "
            f"and {tuple(txt_BD.shape)}"
        )


def clip_loss(img_BD: torch.Tensor, txt_BD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch, computed from this rank's rows.

    Args:
        img_BD: This rank's image features (any float dtype; normalised inside).
        txt_BD: This rank's text features, row i paired with image row i.
        logit_scale: Scalar ``log(1/T)``; logits are ``exp(logit_scale) * cosine``. Not clamped here.

    Returns:
        Scalar ``(CE(img->txt) + CE(txt->img)) / 2`` averaged over this rank's B rows. Its mean over ranks is
        the single-process loss on the N-sample global batch.
    """
    _check_pair(img_BD, txt_BD)
    img_BD, txt_BD = normalize_features(img_BD), normalize_features(txt_BD)
    # Gather with grad: other ranks' rows use our features as negatives, and that gradient must come back.
    all_img_ND = all_gather_with_grad(img_BD)
    all_txt_ND = all_gather_with_grad(txt_BD)
    scale = logit_scale.exp().to(img_BD.dtype)
    logits_img_BN = scale * (img_BD @ all_txt_ND.T)
    logits_txt_BN = scale * (txt_BD @ all_img_ND.T)
    batch = img_BD.shape[0]
    labels_B = torch.arange(batch, device=img_BD.device) + get_rank() * batch
    return (F.cross_entropy(logits_img_BN, labels_B) + F.cross_entropy(logits_txt_BN, labels_B)) / 2


def _sigmoid_block(
    img_BD: torch.Tensor,
    txt_BD: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    positives: bool,
) -> torch.Tensor:
    """Sum of ``-logsigmoid(label * logit)`` over one B x B block (diagonal positive iff ``positives``)."""
    logits_BB = scale * (img_BD @ txt_BD.T) + bias
    if not positives:
        # All labels -1: -logsigmoid(-z) == softplus(z); skips building a labels matrix.
        return F.softplus(logits_BB).sum()
    # -logsigmoid(+z) = softplus(z) - z on the diagonal: same identity, no labels tensor either.
    return F.softplus(logits_BB).sum() - torch.diagonal(logits_BB).sum()


def siglip_loss(
    img_BD: torch.Tensor,
    txt_BD: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    ring: str = "bidir",
) -> torch.Tensor:
    """Sigmoid contrastive loss over the global batch, computed for this rank's images.

    Args:
        img_BD: This rank's image features (normalised inside).
        txt_BD: This rank's text features, row i paired with image row i.
        logit_scale: Scalar log-space scale; logits are ``exp(logit_scale) * cosine + logit_bias``.
        logit_bias: Scalar bias.
        ring: ``"bidir"`` (text blocks travel both ways, ~W/2 rounds; OpenCLIP's default) or ``"shift"``
            (one direction, W-1 rounds). Same result; any world size.

    Returns:
        Scalar ``-sum_{i local, j global} logsigmoid(label_ij * logit_ij) / B``. Its mean over ranks is the
        single-process loss ``sum over all N^2 pairs / N``.
    """
    if ring not in _RINGS:
        raise ValueError(f"ring must be one of {_RINGS}, got {ring!r}")
    _check_pair(img_BD, txt_BD)
    img_BD, txt_BD = normalize_features(img_BD), normalize_features(txt_BD)
    scale = logit_scale.exp().to(img_BD.dtype)
    bias = logit_bias.to(img_BD.dtype)
    total = _sigmoid_block(img_BD, txt_BD, scale, bias, positives=True)

    world, rank = get_world_size(), get_rank()
    right, left = (rank + 1) % world, (rank - 1) % world
    if world > 1 and ring == "shift":
        block_BD = txt_BD
        for _ in range(world - 1):
            block_BD = neighbour_exchange_with_grad(block_BD, to_rank=right, from_rank=left)
            total = total + _sigmoid_block(img_BD, block_BD, scale, bias, positives=False)
    elif world > 1:
        # Each bidir round brings the next block from both sides; after k rounds we hold ranks r-k and r+k.
        # If W-1 is odd one block (rank r + W/2) is left, fetched by one extra rightward hop.
        to_left_BD = to_right_BD = txt_BD
        n_bidir, remainder = divmod(world - 1, 2)
        for _ in range(n_bidir):
            from_left_BD, from_right_BD = neighbour_exchange_bidir_with_grad(
                to_left_BD, to_right_BD, left_rank=left, right_rank=right
            )
            total = total + _sigmoid_block(img_BD, from_left_BD, scale, bias, positives=False)
            total = total + _sigmoid_block(img_BD, from_right_BD, scale, bias, positives=False)
            to_right_BD, to_left_BD = from_left_BD, from_right_BD  # keep each block moving its own way
        if remainder:
            from_left_BD = neighbour_exchange_with_grad(to_right_BD, to_rank=right, from_rank=left)
            total = total + _sigmoid_block(img_BD, from_left_BD, scale, bias, positives=False)
    return total / img_BD.shape[0]


class _ScaledContrastive(nn.Module):
    """Shared handling of the learnable, clamped log-space scale.

    The forward pass caps the scale (``exp(logit_scale) <= max_logit_scale``); :meth:`after_step`, which the
    trainer calls after every optimizer step, clamps the stored parameter to ``[0, ln max_logit_scale]`` as
    OpenCLIP does (:mod:`vlp_core.losses.bounds`), so a step past the cap never freezes the temperature.
    """

    logit_scale: nn.Parameter

    def __init__(self, init_logit_scale: float, learn: bool, max_logit_scale: float) -> None:
        super().__init__()
        lower, self.max_log_scale = log_scale_bounds(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn)
        declare_bounds(self, logit_scale=(lower, self.max_log_scale))

    def _clamped_scale(self) -> torch.Tensor:
        # torch.clamp, not a Python `min(...)`: stays on the device (no host sync). Its gradient is zero past
        # the cap but not at it, so the post-step clamp of the parameter (after_step) keeps it learnable.
        return torch.clamp(self.logit_scale, max=self.max_log_scale)

    def clamp_(self) -> None:
        """Clamp the stored parameter to ``[0, log(max_logit_scale)]`` (what :meth:`after_step` does)."""
        clamp_bounds_(self)

    def after_step(self, finite: torch.Tensor) -> None:
        """The trainer's post-step hook: clamp the stored scale (a no-op after a skipped step)."""
        clamp_bounds_(self)


class ClipLoss(_ScaledContrastive):
    """InfoNCE with a learnable temperature; exact under data parallelism (see :func:`clip_loss`).

    Args:
        init_temperature: Initial T; the parameter is ``log(1/T)``.
        learn_temperature: Whether the scale gets gradients.
        max_logit_scale: Cap on ``exp(logit_scale)`` (i.e. ``T >= 1/max_logit_scale``).
    """

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        super().__init__(math.log(1.0 / init_temperature), learn_temperature, max_logit_scale)

    def forward(self, img_BD: torch.Tensor, txt_BD: torch.Tensor) -> LossOutput:
        """Loss for this rank's ``[B, D]`` features; parts ``loss_contrastive`` and ``logit_scale`` (exp)."""
        scale = self._clamped_scale()
        loss = clip_loss(img_BD, txt_BD, scale)
        return LossOutput(loss, {"loss_contrastive": loss.detach(), "logit_scale": scale.detach().exp()})


class SigLipLoss(_ScaledContrastive):
    """Sigmoid loss with learnable scale and bias; exact under data parallelism (see :func:`siglip_loss`).

    Args:
        init_logit_scale: Initial log-space scale (``log(10)`` as in SigLIP).
        init_bias: Initial bias (-10 as in SigLIP).
        learn: Whether scale and bias get gradients.
        max_logit_scale: Cap on ``exp(logit_scale)``.
        ring: ``"bidir"`` or ``"shift"`` text-block exchange (same result, different latency).
    """

    logit_bias: nn.Parameter

    def __init__(
        self,
        *,
        init_logit_scale: float = math.log(10),
        init_bias: float = -10.0,
        learn: bool = True,
        max_logit_scale: float = 100.0,
        ring: str = "bidir",
    ) -> None:
        if ring not in _RINGS:
            raise ValueError(f"ring must be one of {_RINGS}, got {ring!r}")
        super().__init__(init_logit_scale, learn, max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn)
        self.ring = ring

    def forward(self, img_BD: torch.Tensor, txt_BD: torch.Tensor) -> LossOutput:
        """Loss for this rank's ``[B, D]`` features; parts: loss_contrastive, logit_scale, logit_bias."""
        scale = self._clamped_scale()
        loss = siglip_loss(img_BD, txt_BD, scale, self.logit_bias, ring=self.ring)
        parts = {
            "loss_contrastive": loss.detach(),
            "logit_scale": scale.detach().exp(),
            "logit_bias": self.logit_bias.detach().clone(),
        }
        return LossOutput(loss, parts)
