"""LCL's objective: ``contrastive_weight * L_con + generation_weight * L_gen``, exact under data parallelism.

Shape legend:
    N: images on this rank, K: per-rank capacity of contrastive rows (the same on every rank), W: world
    size, D: embedding width.

- ``L_con``: symmetric InfoNCE between each image latent and the LM's projected state at its ``<soi>``, for
  images whose ``has_context`` flag is set. This rank's rows go against every rank's columns, gathered with
  gradient. Counts differ between ranks, so every rank pads its features to the static capacity ``K`` and
  masks padded and context-free columns (a large finite negative, so even a row with no valid column stays
  finite) and rows; every rank runs the same collectives whatever its count, including zero.
- ``L_gen``: next-token cross entropy summed over this rank's target tokens (the model computes it in
  chunks).

Both are divided by their *global* counts (one all-reduce of four scalars), and multiplied by W: DDP averages
gradients over ranks, so the effective objective is the single-process loss on the global batch (the sum of
the per-rank losses over W). The logged parts are the global values.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp_core.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_sum
from vlp_core.distributed.utils import get_rank, get_world_size
from vlp_core.losses import normalize_features
from vlp_core.method import LossOutput
from vlp_lcl.config import LclConfig

__all__ = ["LclLoss", "contrastive_sum"]

_MASKED = -1e9  # finite: exp() underflows to 0, yet a row with no valid column gives no NaN


def _pad_rows(x_N: Tensor, capacity: int) -> Tensor:
    if x_N.shape[0] > capacity:
        raise ValueError(f"{x_N.shape[0]} images on this rank exceed the capacity {capacity} "
                         "(batch rows x loss.max_images)")
    return torch.cat([x_N, x_N.new_zeros((capacity - x_N.shape[0], *x_N.shape[1:]))])


def contrastive_sum(latent_ND: Tensor, context_ND: Tensor, valid_N: Tensor, logit_scale: Tensor,
                    capacity: int) -> tuple[Tensor, Tensor]:
    """Summed (not averaged) symmetric InfoNCE of this rank's valid rows vs all ranks' valid columns.

    Returns:
        ``(sum over valid local rows of CE_i2t + CE_t2i, number of valid local rows)``.
    """
    with torch.autocast(latent_ND.device.type, enabled=False):
        # At least float32 (float64 stays float64), autocast off: the logits are never half precision.
        x_KD = _pad_rows(normalize_features(latent_ND), capacity)
        y_KD = _pad_rows(normalize_features(context_ND).to(x_KD.dtype), capacity)
        valid_K = _pad_rows(valid_N.to(x_KD.dtype), capacity)
        x_all, y_all = all_gather_with_grad(x_KD), all_gather_with_grad(y_KD)
        valid_all = all_gather_no_grad(valid_K) > 0.5
        scale = logit_scale.to(x_KD.dtype).exp()
        labels_K = torch.arange(capacity, device=x_KD.device) + get_rank() * capacity
        logits_i2t = (scale * x_KD @ y_all.T).masked_fill(~valid_all[None], _MASKED)
        logits_t2i = (scale * y_KD @ x_all.T).masked_fill(~valid_all[None], _MASKED)
        ce_K = (F.cross_entropy(logits_i2t, labels_K, reduction="none")
                + F.cross_entropy(logits_t2i, labels_K, reduction="none"))
        row_ok = valid_K > 0.5
        return torch.where(row_ok, ce_K, torch.zeros_like(ce_K)).sum(), valid_K.sum()


class LclLoss(nn.Module):
    """See the module docstring. Parts: ``loss_con``, ``loss_gen`` (global means), ``pairs``, ``logit_scale``."""

    def __init__(self, cfg: LclConfig) -> None:
        super().__init__()
        self.wc, self.wg = cfg.contrastive_weight, cfg.generation_weight
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)),
                                        requires_grad=cfg.learn_temperature)

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        # torch.clamp keeps the cap on the device and gives zero gradient past it (like clamping after a step).
        log_scale = torch.clamp(self.logit_scale, max=self.max_log_scale)
        con_sum, n_pairs = contrastive_sum(features["image_latent"], features["context"], features["has_context"],
                                           log_scale, features["capacity"])
        gen_sum = features["gen_nll_sum"]
        local = torch.stack([n_pairs, torch.tensor(float(features["gen_tokens"]), device=n_pairs.device,
                                                   dtype=n_pairs.dtype),
                             con_sum.detach(), gen_sum.detach().to(n_pairs.dtype)])
        totals = all_reduce_sum(local.clone())
        world = get_world_size()
        pairs, tokens = totals[0].clamp(min=1.0), totals[1].clamp(min=1.0)
        loss_con = world * con_sum / (2 * pairs)
        loss_gen = world * gen_sum / tokens
        loss = self.wc * loss_con + self.wg * loss_gen
        parts = {"loss_con": totals[2] / (2 * pairs), "loss_gen": totals[3] / tokens, "pairs": totals[0],
                 "logit_scale": log_scale.detach().exp()}
        return LossOutput(loss, parts)
