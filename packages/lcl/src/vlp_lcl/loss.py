"""LCL's objective: ``contrastive_weight * L_con + generation_weight * L_gen``, exact under data parallelism.

Shape legend:
    N: images on this rank, K: per-rank capacity of contrastive rows (the same on every rank), W: world
    size, D: embedding width.

- ``L_con``: symmetric InfoNCE between each image latent and the LM's projected state at its ``<soi>``, for
  images whose ``has_context`` flag is set. This rank's rows go against every rank's columns, gathered with
  gradient. Counts differ between ranks (documents hold 1-6 images, image-first pairs none), so the
  capacity ``K`` is the largest per-rank count of context images, rounded up to a multiple of 8: one
  all-reduce (max) of one integer and one host read per step. Every rank moves its context images to the
  front (a stable sort of the flags, no host sync), keeps the first ``K`` and pads with zeros, then masks
  padded columns (a large finite negative, so even a row with no valid column stays finite) and rows;
  every rank runs the same collectives whatever its count, including zero. The logits are
  ``K x (W K)``: on image-text pairs about ``B/2 x (W B/2)``, what the official code allocates.
- ``L_gen``: next-token cross entropy summed over this rank's target tokens (the model computes it in
  chunks).

Both are divided by their *global* counts (one all-reduce of four scalars), and multiplied by W: DDP averages
gradients over ranks, so the effective objective is the single-process loss on the global batch (the sum of
the per-rank losses over W). The logged parts are the global values.

Exact accumulation (:mod:`vlp_core.train.accumulate`): the model's per-image features are batch-first and its
``gen_nll_sum`` and ``gen_tokens`` are 0-dim per-batch sums, so the chunks' features merge into the rank
batch's; this loss, run once per chunk on them, then sees the whole step's pairs (the capacity included) and
tokens, and the generation part is normalised by the whole step's token count.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vlp_core.distributed import all_gather_no_grad, all_gather_with_grad, all_reduce_sum
from vlp_core.distributed.utils import get_rank, get_world_size, is_initialized
from vlp_core.losses import clamp_bounds_, declare_bounds, log_scale_bounds, normalize_features
from vlp_core.method import LossOutput
from vlp_lcl.config import LclConfig

__all__ = ["LclLoss", "contrastive_capacity", "contrastive_sum"]

_MASKED = -1e9  # finite: exp() underflows to 0, yet a row with no valid column gives no NaN
_ROUND = 8  # the contrastive capacity is a multiple of this


def contrastive_capacity(valid_N: Tensor) -> int:
    """Rows every rank pads its contrastive features to: the largest per-rank count of ``valid_N``.

    Rounded up to a multiple of ``_ROUND`` (at least ``_ROUND``), which keeps the set of shapes small (for
    ``torch.compile``) and never reaches a zero-row gather. One all-reduce (max) of one integer and one
    host read; every rank must call it (it is a collective).
    """
    count_1 = valid_N.sum().reshape(1).to(torch.long)
    if is_initialized() and get_world_size() > 1:
        with torch.no_grad():
            dist.all_reduce(count_1, op=dist.ReduceOp.MAX)
    most = int(count_1.item())
    return max(_ROUND, -(-most // _ROUND) * _ROUND)


def _front_rows(x_ND: Tensor, order_N: Tensor, capacity: int) -> Tensor:
    """Rows ``order_N[:capacity]`` of ``x_ND`` (the valid ones first), zero-padded to ``capacity`` rows."""
    x_KD = x_ND[order_N[:capacity]]
    return torch.cat([x_KD, x_KD.new_zeros((capacity - x_KD.shape[0], *x_KD.shape[1:]))])


def contrastive_sum(latent_ND: Tensor, context_ND: Tensor, valid_N: Tensor, logit_scale: Tensor,
                    capacity: int | None = None) -> tuple[Tensor, Tensor]:
    """Summed (not averaged) symmetric InfoNCE of this rank's valid rows vs all ranks' valid columns.

    Args:
        capacity: Rows per rank (the same on every rank, at least every rank's valid count); by default
            :func:`contrastive_capacity` (a collective).

    Returns:
        ``(sum over valid local rows of CE_i2t + CE_t2i, number of valid local rows)``.
    """
    K = contrastive_capacity(valid_N) if capacity is None else capacity
    if valid_N.device.type == "cpu" and int(valid_N.sum()) > K:  # free on CPU; a host sync elsewhere
        raise ValueError(f"{int(valid_N.sum())} contrastive pairs on this rank exceed the capacity {K}")
    # Stable: the valid rows keep their order, so row k of the compacted block is this rank's k-th pair.
    order_N = torch.argsort((~valid_N).to(torch.int8), stable=True)
    with torch.autocast(latent_ND.device.type, enabled=False):
        # At least float32 (float64 stays float64), autocast off: the logits are never half precision.
        x_KD = _front_rows(normalize_features(latent_ND), order_N, K)
        y_KD = _front_rows(normalize_features(context_ND).to(x_KD.dtype), order_N, K)
        valid_K = _front_rows(valid_N.to(x_KD.dtype), order_N, K)
        x_all, y_all = all_gather_with_grad(x_KD), all_gather_with_grad(y_KD)
        invalid_all = all_gather_no_grad(valid_K) < 0.5
        scale = logit_scale.to(x_KD.dtype).exp()
        labels_K = torch.arange(K, device=x_KD.device) + get_rank() * K
        # In place on the fresh matmul outputs: one K x WK buffer per direction before the cross entropy.
        logits_i2t = (scale * x_KD @ y_all.T).masked_fill_(invalid_all[None], _MASKED)
        ce_K = F.cross_entropy(logits_i2t, labels_K, reduction="none")
        del logits_i2t
        logits_t2i = (scale * y_KD @ x_all.T).masked_fill_(invalid_all[None], _MASKED)
        ce_K = ce_K + F.cross_entropy(logits_t2i, labels_K, reduction="none")
        row_ok = valid_K > 0.5
        return torch.where(row_ok, ce_K, torch.zeros_like(ce_K)).sum(), valid_K.sum()


class LclLoss(nn.Module):
    """See the module docstring. Parts: ``loss_con``, ``loss_gen`` (global means), ``pairs``, ``logit_scale``."""

    def __init__(self, cfg: LclConfig) -> None:
        super().__init__()
        self.wc, self.wg = cfg.contrastive_weight, cfg.generation_weight
        lower, self.max_log_scale = log_scale_bounds(cfg.max_logit_scale, key="loss.max_logit_scale")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)),
                                        requires_grad=cfg.learn_temperature)
        declare_bounds(self, logit_scale=(lower, self.max_log_scale))  # [0, ln 100] after each step (spec)

    def after_step(self, finite: Tensor) -> None:
        """After each optimizer step: the stored logit scale back into ``[0, ln max_logit_scale]``."""
        clamp_bounds_(self)

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        # torch.clamp keeps the cap on the device; zero gradient past it but not at it (after_step keeps the
        # parameter within the bounds, so it stays learnable).
        log_scale = torch.clamp(self.logit_scale, max=self.max_log_scale)
        con_sum, n_pairs = contrastive_sum(features["image_latent"], features["context"], features["has_context"],
                                           log_scale)
        gen_sum = features["gen_nll_sum"]
        tokens_local = torch.as_tensor(features["gen_tokens"], dtype=n_pairs.dtype, device=n_pairs.device)
        local = torch.stack([n_pairs, tokens_local.reshape(()),
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
