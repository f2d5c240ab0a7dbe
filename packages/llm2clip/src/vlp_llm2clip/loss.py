"""Losses: stage 1's supervised SimCSE (caption-to-caption) and stage 2's symmetric image-text InfoNCE.

Legend: B per-rank batch, W world size, N = W*B global batch, D embedding dim.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import all_gather_with_grad
from vlp_core.distributed.utils import get_rank
from vlp_core.losses import ClipLoss, clamp_bounds_, normalize_features
from vlp_core.method import LossOutput

__all__ = ["simcse_loss", "SimCseLoss", "ImageTextLoss"]


def simcse_loss(q_BD: torch.Tensor, p_BD: torch.Tensor, n_BD: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One-directional InfoNCE of queries against all positives and hard negatives of the global batch.

    ``S = scale * cos(q, [P; Nneg])`` with ``P``/``Nneg`` gathered over ranks (with gradient), label of local
    row i = ``rank * B + i``; the mean over this rank's rows, whose mean over ranks is the global loss
    (llm2vec's ``HardNegativeNLLLoss``, ``scale`` 50 = temperature 0.02). There is no p -> q term.
    """
    if q_BD.shape != p_BD.shape or (n_BD is not None and n_BD.shape != q_BD.shape):
        raise ValueError(f"query/positive/negative shapes differ: {tuple(q_BD.shape)}, {tuple(p_BD.shape)}, "
                         f"{None if n_BD is None else tuple(n_BD.shape)}")
    q_BD, p_BD = normalize_features(q_BD), normalize_features(p_BD)
    docs = [all_gather_with_grad(p_BD)]
    if n_BD is not None:
        docs.append(all_gather_with_grad(normalize_features(n_BD)))
    d_MD = torch.cat(docs)  # [N] or [2N] documents
    logits_BM = scale * (q_BD @ d_MD.T)
    labels_B = torch.arange(q_BD.shape[0], device=q_BD.device) + get_rank() * q_BD.shape[0]
    return F.cross_entropy(logits_BM, labels_B)


class SimCseLoss(nn.Module):
    """Stage 1: ``simcse_loss`` over the model's ``q``/``p``/(``n``) features, with a fixed scale."""

    def __init__(self, scale: float = 50.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"loss.scale must be positive, got {scale}")
        self.scale = scale

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        loss = simcse_loss(features["q"], features["p"], features.get("n"), self.scale)
        return LossOutput(loss, {"loss_simcse": loss.detach()})


class ImageTextLoss(nn.Module):
    """Stage 2: the core's symmetric InfoNCE (global gather, clamped learnable logit scale)."""

    def __init__(self, *, init_temperature: float, learn_temperature: bool, max_logit_scale: float) -> None:
        super().__init__()
        self.loss = ClipLoss(init_temperature=init_temperature, learn_temperature=learn_temperature,
                             max_logit_scale=max_logit_scale)

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        return self.loss(features["image_features"], features["text_features"])

    def after_step(self, finite: torch.Tensor) -> None:
        """After each optimizer step: the stored logit scale back into ``[0, ln max_logit_scale]`` (the
        official loop's clamp; :mod:`vlp_core.losses.bounds`)."""
        clamp_bounds_(self)
