"""ALIP (Yang et al., ICCV 2023): raw text and synthetic caption per image, two consistency gates and an
adaptive contrastive loss, plugged into vlp-core through ``MethodSpec``."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlp_alip.config import AlipConfig
from vlp_alip.data import AlipAdapter
from vlp_alip.loss import AlipLoss, gate_weights, weighted_clip_loss
from vlp_alip.model import AlipModel
from vlp_alip.presets import PRESETS
from vlp_core.config import RunConfig
from vlp_core.method import MethodSpec

__version__ = "0.1.0"
__all__ = ["METHOD", "AlipConfig", "AlipAdapter", "AlipLoss", "AlipModel", "gate_weights",
           "weighted_clip_loss", "build_model", "build_loss", "build_adapter"]


def build_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    return AlipModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id,
                     bos_id=tokenizer.bos_id)


def build_loss(cfg: RunConfig) -> nn.Module:
    return AlipLoss(cfg.loss)


def build_adapter(cfg: RunConfig, tokenizer: Any) -> AlipAdapter:
    return AlipAdapter(tokenizer, image_size=cfg.model.vision.image_size, raw_key=cfg.loss.raw_key,
                       caption_key=cfg.loss.caption_key, missing_caption=cfg.loss.missing_caption,
                       augment=cfg.data.augment, interpolation=cfg.model.vision.interpolation)


METHOD = MethodSpec(
    name="alip",
    config_cls=AlipConfig,
    presets=PRESETS,
    build_model=build_model,
    build_loss=build_loss,
    build_adapter=build_adapter,
    # The loss couples the batch's samples: with train.accum_steps > 1 one step gives the whole batch's gradient.
    exact_accumulation=True,
    description="ALIP: contrastive pre-training on raw text and synthetic captions with consistency gates",
)
