"""DreamLIP's losses: the multi-positive contrastive loss (MPCL) and the sub-caption grouping loss (SGL).

MPCL, per caption slot (the official ``declip`` form, whose text-to-image half is the paper's Eq. 5):
``L = 1/T sum_j 1/2 [CE(s V T_j^T) + CE(s T_j V^T)]`` over the global batch, every slot j = 0..K (slot 0 is
the raw caption) contrasted against all images. With K = 0 it is the CLIP loss. Local rows against gathered
columns (with gradient), so the mean over ranks is the single-process loss on the global batch.

SGL: each text's similarity to its own image's patches is min-max normalised, thresholded at sigma and
renormalised into weights that pool the patches into a text-specific image embedding g; g is contrasted with
its text using a separate learnable temperature. ``"image"`` negatives (the paper) are the other texts'
groupings of the same image and need no communication; ``"global"`` (the official code) is a symmetric
InfoNCE over every text of the global batch. Each image's unique texts are averaged, then the images, so
duplicates (a pool smaller than K) count once and the per-rank mean is exact under data parallelism.

Legend: B per-rank batch, W world size, G = W * B global batch, T texts per image, N patches, D dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import all_gather_no_grad, all_gather_with_grad, get_rank
from vlp_core.losses import clamp_bounds_, declare_bounds, log_scale_bounds, normalize_features
from vlp_core.method import LossOutput
from vlp_dreamlip.config import DreamLipConfig

__all__ = ["multi_positive_loss", "grouping_weights", "grouped_embeddings", "subcaption_grouping_loss",
           "DreamLipLoss"]


def multi_positive_loss(img_BD: torch.Tensor, txt_BTD: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Per-slot symmetric InfoNCE averaged over the T slots, for this rank's rows (normalised inside).

    Args:
        img_BD: This rank's image features.
        txt_BTD: This rank's text features, T per image (slot j of row i is a positive of image i).
        logit_scale: Scalar ``log(1/temperature)``.

    Returns:
        Scalar whose mean over ranks is ``1/T sum_j (CE_i2t_j + CE_t2i_j) / 2`` on the global batch.
    """
    if img_BD.ndim != 2 or txt_BTD.ndim != 3 or txt_BTD.shape[0] != img_BD.shape[0] \
            or txt_BTD.shape[2] != img_BD.shape[1]:
        raise ValueError(f"expected image features [B, D] and text features [B, T, D], got "
                         f"{tuple(img_BD.shape)} and {tuple(txt_BTD.shape)}")
    v_BD, t_BTD = normalize_features(img_BD), normalize_features(txt_BTD)
    all_v_GD, all_t_GTD = all_gather_with_grad(v_BD), all_gather_with_grad(t_BTD)
    scale = logit_scale.exp().to(v_BD.dtype)
    b, t = t_BTD.shape[:2]
    logits_i2t_TBG = scale * torch.einsum("bd,gtd->tbg", v_BD, all_t_GTD)
    logits_t2i_TBG = scale * torch.einsum("btd,gd->tbg", t_BTD, all_v_GD)
    labels_TB = (torch.arange(b, device=v_BD.device) + get_rank() * b).repeat(t)
    return (F.cross_entropy(logits_i2t_TBG.flatten(0, 1), labels_TB)
            + F.cross_entropy(logits_t2i_TBG.flatten(0, 1), labels_TB)) / 2


def grouping_weights(txt_BTD: torch.Tensor, patches_BND: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
    """Patch weights [B, T, N] of each (normalised) text over its own image's (normalised) patches.

    Cosine similarity, min-max normalised over the patches, zeroed below ``sigma`` and renormalised to sum
    to one. Gradients flow through the weights to both texts and patches (no stop-gradient, as in the code).
    """
    a_BTN = torch.einsum("btd,bnd->btn", txt_BTD, patches_BND)
    lo, hi = a_BTN.amin(-1, keepdim=True), a_BTN.amax(-1, keepdim=True)
    w_BTN = (a_BTN - lo) / (hi - lo + 1e-10)
    w_BTN = torch.where(w_BTN >= sigma, w_BTN, torch.zeros_like(w_BTN))
    return w_BTN / w_BTN.sum(-1, keepdim=True).clamp_min(1e-6)


def grouped_embeddings(weights_BTN: torch.Tensor, patches_BND: torch.Tensor) -> torch.Tensor:
    """The text-specific image embeddings g [B, T, D] (normalised): weighted patch means."""
    return F.normalize(torch.einsum("btn,bnd->btd", weights_BTN, patches_BND), dim=-1)


def _slot_masks(ids_BT: torch.Tensor, mask_duplicates: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks from the duplicate ids [B, T] (``ids[b, j] == j``: first occurrence of its text).

    Returns ``(same_BTT, later_BT, row_w_BT)``: another slot of the same image holding the same text (bool);
    the slot repeats an earlier one (bool, masked as a negative for every text); per-image row weights that
    average each image's unique texts. Masking both makes a batch with repeats equal to the same batch
    without them. Without ``mask_duplicates`` nothing is masked and every slot weighs 1/T.
    """
    b, t = ids_BT.shape
    eye_TT = torch.eye(t, dtype=torch.bool, device=ids_BT.device)
    first_BT = ids_BT == torch.arange(t, device=ids_BT.device)
    if not mask_duplicates:
        zeros = eye_TT.new_zeros(b, t)
        return eye_TT.new_zeros(b, t, t), zeros, torch.full((b, t), 1.0 / t, dtype=dtype, device=ids_BT.device)
    same_BTT = (ids_BT[:, :, None] == ids_BT[:, None, :]) & ~eye_TT
    w_BT = first_BT.to(dtype)
    return same_BTT, ~first_BT, w_BT / w_BT.sum(1, keepdim=True).clamp_min(1.0)


def subcaption_grouping_loss(txt_BTD: torch.Tensor, patches_BND: torch.Tensor, logit_scale: torch.Tensor,
                             *, caption_ids_BT: torch.Tensor | None = None, sigma: float = 0.0,
                             negatives: str = "image", mask_duplicates: bool = True) -> torch.Tensor:
    """The SGL for this rank's images (features normalised inside).

    Args:
        txt_BTD: Text features, T per image.
        patches_BND: Projected patch tokens of the same images.
        logit_scale: Scalar log-space scale of the SGL's own temperature.
        caption_ids_BT: Duplicate ids (``vlp_dreamlip.data.duplicate_ids``); None = all texts distinct.
        sigma: Threshold on the min-max normalised weights.
        negatives: ``"image"`` (same image's other texts) or ``"global"`` (all texts of the global batch,
            symmetric, as the official code).
        mask_duplicates: Drop duplicate texts from the negatives and count each text of an image once.

    Returns:
        Scalar: mean over images of the mean over each image's (unique) texts; its mean over ranks is the
        single-process value on the global batch.
    """
    if negatives not in ("image", "global"):
        raise ValueError(f"negatives must be 'image' or 'global', got {negatives!r}")
    b, t = txt_BTD.shape[:2]
    t_BTD, p_BND = normalize_features(txt_BTD), normalize_features(patches_BND)
    g_BTD = grouped_embeddings(grouping_weights(t_BTD, p_BND, sigma), p_BND)
    ids_BT = caption_ids_BT if caption_ids_BT is not None else \
        torch.arange(t, device=t_BTD.device).expand(b, t)
    same_BTT, later_BT, row_w_BT = _slot_masks(ids_BT, mask_duplicates, t_BTD.dtype)
    eye_TT = torch.eye(t, dtype=torch.bool, device=t_BTD.device)
    scale = logit_scale.exp().to(t_BTD.dtype)
    if negatives == "image":
        mask_BTT = same_BTT | (later_BT[:, None, :] & ~eye_TT)  # the label column is never masked
        logits_BTT = (scale * torch.einsum("btd,bkd->btk", t_BTD, g_BTD)).masked_fill(mask_BTT, float("-inf"))
        labels = torch.arange(t, device=t_BTD.device).repeat(b)
        ce_BT = F.cross_entropy(logits_BTT.flatten(0, 1), labels, reduction="none").view(b, t)
    else:
        all_t_MD = all_gather_with_grad(t_BTD).flatten(0, 1)  # M = G * T, rows ordered (image, slot)
        all_g_MD = all_gather_with_grad(g_BTD).flatten(0, 1)
        g = all_t_MD.shape[0] // t
        mine_B = torch.arange(b, device=t_BTD.device) + get_rank() * b
        # Repeated texts of every image are masked for all rows; a text's copies in its own image for its row.
        later_GT = all_gather_no_grad(later_BT.to(torch.uint8)).bool()  # gloo has no bool all_gather
        mask_BTGT = later_GT[None, None].expand(b, t, g, t).clone()
        own = torch.arange(b, device=t_BTD.device)
        mask_BTGT[own, :, mine_B, :] = same_BTT | (later_BT[:, None, :] & ~eye_TT)
        dup_BTM = mask_BTGT.flatten(2, 3)
        labels = (mine_B[:, None] * t + torch.arange(t, device=t_BTD.device)).flatten()
        logits_t2g = (scale * torch.einsum("btd,md->btm", t_BTD, all_g_MD)).masked_fill(dup_BTM, float("-inf"))
        logits_g2t = (scale * torch.einsum("btd,md->btm", g_BTD, all_t_MD)).masked_fill(dup_BTM, float("-inf"))
        ce_BT = (F.cross_entropy(logits_t2g.flatten(0, 1), labels, reduction="none")
                 + F.cross_entropy(logits_g2t.flatten(0, 1), labels, reduction="none")).view(b, t) / 2
    return (ce_BT * row_w_BT).sum(1).mean()


class DreamLipLoss(nn.Module):
    """``lambda_mpcl * MPCL + lambda_sgl * SGL`` with two learnable temperatures (each capped at
    ``max_logit_scale`` and clamped to ``[0, ln max_logit_scale]`` after every step; the SGL one exists only
    when the SGL is on).

    Features: ``image_features`` [B, D], ``text_features`` [B, T, D] and, for the SGL, ``patch_features``
    [B, N, D]; ``batch["caption_ids"]`` [B, T] marks duplicate texts.
    """

    def __init__(self, cfg: DreamLipConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        lower, self.max_log_scale = log_scale_bounds(cfg.max_logit_scale, key="loss.max_logit_scale")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)),
                                        requires_grad=cfg.learn_temperature)
        self.logit_scale_local = (
            nn.Parameter(torch.tensor(math.log(1 / cfg.sgl_init_temperature)), requires_grad=cfg.learn_temperature)
            if cfg.sgl_weight > 0 else None
        )
        # Both clamped to [0, ln max] after every step, as the official training loop does.
        declare_bounds(self, logit_scale=(lower, self.max_log_scale),
                       logit_scale_local=(lower, self.max_log_scale))

    def _scale(self, p: torch.Tensor) -> torch.Tensor:
        # On the device, no host sync; zero gradient past the bounds (not at them: after_step keeps the
        # parameters within them, so they stay learnable).
        return torch.clamp(p, min=0.0, max=self.max_log_scale)

    def after_step(self, finite: torch.Tensor) -> None:
        """After each optimizer step: both stored temperatures back into ``[0, ln max_logit_scale]``."""
        clamp_bounds_(self)

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        txt_BTD = features["text_features"]
        if txt_BTD.ndim == 2:
            txt_BTD = txt_BTD[:, None]
        scale = self._scale(self.logit_scale)
        mpcl = multi_positive_loss(features["image_features"], txt_BTD, scale)
        loss = self.cfg.mpcl_weight * mpcl
        parts = {"loss_mpcl": mpcl.detach(), "logit_scale": scale.detach().exp()}
        if self.logit_scale_local is not None:
            if "patch_features" not in features:
                raise ValueError("the sub-caption grouping loss needs features['patch_features'] [B, N, D]")
            local = self._scale(self.logit_scale_local)
            sgl = subcaption_grouping_loss(
                txt_BTD, features["patch_features"], local, caption_ids_BT=batch.get("caption_ids"),
                sigma=self.cfg.sgl_sigma, negatives=self.cfg.sgl_negatives,
                mask_duplicates=self.cfg.mask_duplicates)
            loss = loss + self.cfg.sgl_weight * sgl
            parts.update(loss_sgl=sgl.detach(), logit_scale_local=local.detach().exp())
        return LossOutput(loss, parts)
