"""ALIP's gates and adaptive contrastive loss (spec sections 3 and 4), exact under data parallelism.

One step on each rank: normalise this rank's image, raw-text and caption features, gather them once (with
gradient, one collective for all three), compute the per-sample similarities of the global batch without
gradient, compute the new running averages H, derive the gate weights from them, slice the weights to this
rank's rows and evaluate two per-sample weighted symmetric InfoNCE losses, local rows against the gathered
columns. The mean over ranks of the local loss is the single-process loss on the global batch.

H (buffers, so they are checkpointed) is not written by ``forward``: the new values are staged there and
applied by ``after_step(finite)``, which the trainer calls once per optimizer step. So under exact gradient
accumulation (``forward`` runs once per chunk, each time on the whole batch's features) H moves once per step
on the whole batch, and a step that the NaN guard skips leaves H unchanged. ``after_step`` also clamps the
stored logit scale to ``[0, ln max_logit_scale]`` (the official code's clamp after every step).

Tensor-name legend:
    B: per-rank batch, W: world size, N = W*B: global batch, D: embedding dim, K = 3 (image, text, caption).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_alip.config import AlipConfig
from vlp_core.distributed.collectives import all_gather_no_grad, all_gather_with_grad
from vlp_core.distributed.utils import get_rank
from vlp_core.losses import clamp_bounds_, declare_bounds, log_scale_bounds, normalize_features
from vlp_core.method import LossOutput

__all__ = ["AlipLoss", "gate_weights", "weighted_clip_loss", "row_similarity"]


def row_similarity(a_ND: torch.Tensor, b_ND: torch.Tensor) -> torch.Tensor:
    """``[N]`` dot products of matching rows (cosines for normalised rows), never the N x N matrix."""
    return (a_ND * b_ND).sum(dim=-1)


@torch.no_grad()
def gate_weights(
    s_tc_N: torch.Tensor,
    s_xt_N: torch.Tensor,
    s_xc_N: torch.Tensor,
    h_tc: torch.Tensor,
    h_xt: torch.Tensor,
    h_xc: torch.Tensor,
    *,
    gamma_s: float = 2.0,
    gamma_p: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Language and Description Consistency Gates (eq. 2 and 4): ``(W^s, W^t, W^c)``, each ``[N]``, detached.

    ``W^s = exp(gamma_s * min(S_tc - H_tc, 0))`` lies in (0, 1]. A sample is low-quality where ``W^s < 1``
    (the official code's test ``exp(S_tc - H_tc)**2 < 1``, i.e. ``S_tc < H_tc``); only there the unclipped
    pair weights ``W^t = exp(gamma_p (S_xt - H_xt))`` and ``W^c = exp(gamma_p (S_xc - H_xc))`` apply, elsewhere
    they are 1. So ``W^t = W^c = 1`` wherever ``W^s = 1``, exactly, even where ``exp`` rounds to 1.
    """
    ws_N = torch.exp(gamma_s * (s_tc_N - h_tc).clamp(max=0.0))
    low_N = ws_N < 1
    one = torch.ones((), dtype=ws_N.dtype, device=ws_N.device)
    wt_N = torch.where(low_N, torch.exp(gamma_p * (s_xt_N - h_xt)), one)
    wc_N = torch.where(low_N, torch.exp(gamma_p * (s_xc_N - h_xc)), one)
    return ws_N, wt_N, wc_N


def weighted_clip_loss(
    img_BD: torch.Tensor,
    txt_BD: torch.Tensor,
    all_img_ND: torch.Tensor,
    all_txt_ND: torch.Tensor,
    scale: torch.Tensor,
    weight_B: torch.Tensor,
) -> torch.Tensor:
    """Per-sample weighted symmetric InfoNCE of this rank's rows against the global columns.

    Args:
        img_BD, txt_BD: This rank's normalised features, row i paired with row i.
        all_img_ND, all_txt_ND: The gathered normalised features (this rank's block at ``rank * B``), with
            gradient (:func:`all_gather_with_grad`).
        scale: The logit scale ``exp(logit_scale)`` (not its log).
        weight_B: Detached weights of this rank's rows; both directions of anchor i get ``weight_B[i]``,
            negatives are not re-weighted.

    Returns:
        ``mean_i weight_i * (CE_i(img->txt) + CE_i(txt->img)) / 2`` over this rank's rows; its mean over ranks
        is the mean over the N samples of the global batch (not normalised by the weights' sum, as in the
        official code). All weights 1 give :func:`vlp_core.losses.clip_loss`.
    """
    batch = img_BD.shape[0]
    labels_B = torch.arange(batch, device=img_BD.device) + get_rank() * batch
    scale = scale.to(img_BD.dtype)
    ce_img_B = F.cross_entropy(scale * (img_BD @ all_txt_ND.T), labels_B, reduction="none")
    ce_txt_B = F.cross_entropy(scale * (txt_BD @ all_img_ND.T), labels_B, reduction="none")
    return (weight_B.to(ce_img_B.dtype) * (ce_img_B + ce_txt_B)).mean() / 2


class AlipLoss(nn.Module):
    """L = L_xt + L_xc with the gate weights; holds the shared temperature and the running averages.

    ``forward(features, batch)`` reads ``image_features``, ``text_features`` (raw text) and
    ``caption_features`` (synthetic caption), each ``[B, D]``; ``batch["raw_is_noisy"]`` (optional, ``[B]``
    bool, known only for the shapes world) adds the mean weights of noisy and clean samples to the parts.
    """

    h_tc: torch.Tensor
    h_xt: torch.Tensor
    h_xc: torch.Tensor

    def __init__(self, cfg: AlipConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        lower, self.max_log_scale = log_scale_bounds(cfg.max_logit_scale, key="loss.max_logit_scale")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)),
                                        requires_grad=cfg.learn_temperature)
        declare_bounds(self, logit_scale=(lower, self.max_log_scale))  # [0, ln 100] after each step (spec)
        for name in ("h_tc", "h_xt", "h_xc"):  # method state: saved in checkpoints, restored on resume
            self.register_buffer(name, torch.tensor(float(cfg.h_init)))
        # H's next values (tc, xt, xc), staged by forward and applied by after_step; not checkpointed.
        self.register_buffer("h_next", torch.full((3,), float(cfg.h_init)), persistent=False)

    def clamp_(self) -> None:
        """Clamp the stored logit scale to ``[0, ln(max_logit_scale)]`` (as after every official step)."""
        clamp_bounds_(self)

    @torch.no_grad()
    def _stage_running(self, s_tc_N: torch.Tensor, s_xt_N: torch.Tensor,
                       s_xc_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage ``H <- m H + (1 - m) mean(S)`` on the global batch in ``h_next``; the new (tc, xt, xc).

        On the device, no host sync; the buffers H change only in :meth:`after_step`.
        """
        m = self.cfg.momentum
        new = [torch.add(h * m, s_N.mean().to(h.dtype), alpha=1.0 - m)
               for h, s_N in ((self.h_tc, s_tc_N), (self.h_xt, s_xt_N), (self.h_xc, s_xc_N))]
        self.h_next.copy_(torch.stack(new))
        return new[0], new[1], new[2]

    @torch.no_grad()
    def after_step(self, finite: torch.Tensor) -> None:
        """Apply the staged H once per optimizer step; keep H where ``finite`` (0-dim bool) is False; clamp
        the stored logit scale into ``[0, ln max_logit_scale]`` (:mod:`vlp_core.losses.bounds`).

        ``torch.where`` on the device: no host sync. It selects, so the stage of a skipped step (NaN where the
        batch itself held a NaN) never reaches H, not even as ``0 * NaN``. A second call without a ``forward``
        in between changes nothing (the stage is reset to H).
        """
        for i, h in enumerate((self.h_tc, self.h_xt, self.h_xc)):
            h.copy_(torch.where(finite.to(h.device), self.h_next[i].to(h.dtype), h))
            self.h_next[i] = h
        clamp_bounds_(self)

    def forward(self, features: dict[str, torch.Tensor], batch: dict[str, Any]) -> LossOutput:
        x_BD, t_BD, c_BD = (features[k] for k in ("image_features", "text_features", "caption_features"))
        if not (x_BD.ndim == 2 and x_BD.shape == t_BD.shape == c_BD.shape):
            raise ValueError(f"expected image, text and caption features of one [B, D] shape, got "
                             f"{tuple(x_BD.shape)}, {tuple(t_BD.shape)} and {tuple(c_BD.shape)}")
        local_BKD = torch.stack([normalize_features(f) for f in (x_BD, t_BD, c_BD)], dim=1)
        x_BD, t_BD, c_BD = local_BKD.unbind(1)
        all_NKD = all_gather_with_grad(local_BKD)  # the step's only feature collective
        all_x_ND, all_t_ND, all_c_ND = all_NKD.unbind(1)

        with torch.no_grad():
            xd_ND, td_ND, cd_ND = all_NKD.detach().unbind(1)
            s_tc_N, s_xt_N, s_xc_N = (row_similarity(td_ND, cd_ND), row_similarity(xd_ND, td_ND),
                                      row_similarity(xd_ND, cd_ND))
            h_tc, h_xt, h_xc = self._stage_running(s_tc_N, s_xt_N, s_xc_N)  # new H first, then used (as the code)
            ws_N, wt_N, wc_N = gate_weights(s_tc_N, s_xt_N, s_xc_N, h_tc, h_xt, h_xc,
                                            gamma_s=self.cfg.gamma_s, gamma_p=self.cfg.gamma_p)
            one = torch.ones_like(ws_N)
            ws_N = ws_N if self.cfg.use_ws else one
            wt_N = wt_N if self.cfg.use_wt else one
            wc_N = wc_N if self.cfg.use_wc else one
            w_xt_N, w_xc_N = ws_N * wt_N, ws_N * wc_N
            batch_size = x_BD.shape[0]
            rows = slice(get_rank() * batch_size, (get_rank() + 1) * batch_size)  # weights of our rows

        scale = torch.clamp(self.logit_scale, max=self.max_log_scale).exp()
        loss_xt = weighted_clip_loss(x_BD, t_BD, all_x_ND, all_t_ND, scale, w_xt_N[rows])
        loss_xc = weighted_clip_loss(x_BD, c_BD, all_x_ND, all_c_ND, scale, w_xc_N[rows])
        parts = {
            "loss_xt": loss_xt.detach(), "loss_xc": loss_xc.detach(), "logit_scale": scale.detach(),
            "H_tc": h_tc, "H_xt": h_xt, "H_xc": h_xc,  # the values this step uses (applied after it)
            "S_tc_mean": s_tc_N.mean(), "S_xt_mean": s_xt_N.mean(), "S_xc_mean": s_xc_N.mean(),
            "gate_ws_mean": ws_N.mean(), "gate_wt_mean": wt_N.mean(), "gate_wc_mean": wc_N.mean(),
            "gate_low_frac": (ws_N < 1).float().mean(),
        }
        if "raw_is_noisy" in batch:
            parts.update(_noisy_clean_means(batch["raw_is_noisy"], ws_N, w_xt_N, w_xc_N))
        return LossOutput(loss_xt + loss_xc, parts)


@torch.no_grad()
def _noisy_clean_means(noisy_B: torch.Tensor, ws_N: torch.Tensor, w_xt_N: torch.Tensor,
                       w_xc_N: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean weights over the global batch's samples with a wrong raw caption and over the others."""
    noisy_N = all_gather_no_grad(noisy_B.to(device=ws_N.device, dtype=ws_N.dtype).reshape(-1))
    clean_N = 1 - noisy_N
    out = {"noisy_frac": noisy_N.mean()}
    for name, w_N in (("ws", ws_N), ("w_xt", w_xt_N), ("w_xc", w_xc_N)):
        out[f"gate_{name}_noisy"] = (w_N * noisy_N).sum() / noisy_N.sum().clamp(min=1)
        out[f"gate_{name}_clean"] = (w_N * clean_N).sum() / clean_N.sum().clamp(min=1)
    return out
