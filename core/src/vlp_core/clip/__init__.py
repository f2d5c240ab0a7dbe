"""The CLIP/SigLIP baseline, plugged into the core through the same ``MethodSpec`` as every method."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp_core.clip.config import ClipConfig
from vlp_core.clip.presets import PRESETS
from vlp_core.config import RunConfig
from vlp_core.data.adapters import ImageTextAdapter
from vlp_core.losses import ClipLoss, SigLipLoss, clamp_bounds_
from vlp_core.method import LossOutput, MethodSpec
from vlp_core.models.dual import DualEncoder

__all__ = ["METHOD", "ClipConfig", "ContrastiveObjective", "build_model", "build_loss", "build_adapter"]


class ContrastiveObjective(nn.Module):
    """InfoNCE or SigLIP over ``image_features`` and ``text_features``."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        if cfg.kind == "infonce":
            self.loss = ClipLoss(init_temperature=cfg.init_temperature, learn_temperature=cfg.learn_temperature,
                                 max_logit_scale=cfg.max_logit_scale)
        else:
            self.loss = SigLipLoss(init_logit_scale=cfg.siglip_init_logit_scale, init_bias=cfg.siglip_init_bias,
                                   learn=cfg.learn_temperature, max_logit_scale=cfg.max_logit_scale)

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        return self.loss(features["image_features"], features["text_features"])

    def after_step(self, finite: torch.Tensor) -> None:
        """After each optimizer step: the stored logit scale back into ``[0, ln max_logit_scale]``."""
        clamp_bounds_(self)


def build_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    return DualEncoder(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                       eot_id=getattr(tokenizer, "eot_id", None), bos_id=getattr(tokenizer, "bos_id", None))


def build_loss(cfg: RunConfig) -> nn.Module:
    return ContrastiveObjective(cfg.loss)


def build_adapter(cfg: RunConfig, tokenizer: Any) -> ImageTextAdapter:
    return ImageTextAdapter(tokenizer, image_size=cfg.model.vision.image_size,
                            caption_keys=cfg.loss.caption_keys, augment=cfg.data.augment,
                            interpolation=cfg.model.vision.interpolation)


METHOD = MethodSpec(
    name="clip",
    config_cls=ClipConfig,
    presets=PRESETS,
    build_model=build_model,
    build_loss=build_loss,
    build_adapter=build_adapter,
    exact_accumulation=True,
    description="CLIP (InfoNCE) or SigLIP (sigmoid) contrastive pre-training of a dual encoder",
)
