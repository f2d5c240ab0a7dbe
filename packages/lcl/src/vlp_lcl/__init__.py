"""vlp-lcl: LCL (Latent Compression Learning, Yang et al. 2024) on interleaved documents and pairs."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlp_core.config import RunConfig
from vlp_core.method import MethodSpec
from vlp_lcl.config import LclConfig
from vlp_lcl.data import LclAdapter, SpecialIds
from vlp_lcl.loss import LclLoss
from vlp_lcl.model import LclModel
from vlp_lcl.presets import PRESETS

__all__ = ["METHOD", "LclConfig", "LclModel", "LclLoss", "LclAdapter", "SpecialIds", "__version__"]

__version__ = "0.1.0"


def build_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    return LclModel(cfg, tokenizer)


def build_loss(cfg: RunConfig) -> nn.Module:
    return LclLoss(cfg.loss)


def build_adapter(cfg: RunConfig, tokenizer: Any) -> LclAdapter:
    v = cfg.model.vision
    if v.timm_name:
        raise ValueError("LCL's adapter needs the patch count: use an explicit ViT (empty vision.timm_name)")
    return LclAdapter(tokenizer, cfg.loss, image_size=v.image_size,
                      num_image_tokens=(v.image_size // v.patch_size) ** 2,
                      context_length=cfg.model.text.context_length, augment=cfg.data.augment)


METHOD = MethodSpec(
    name="lcl",
    config_cls=LclConfig,
    presets=PRESETS,
    build_model=build_model,
    build_loss=build_loss,
    build_adapter=build_adapter,
    # Per-image features concatenate and the generation loss is a 0-dim sum with a 0-dim token count, both
    # added over chunks: the loss then normalises by the whole step's pairs and tokens (vlp_lcl.loss).
    exact_accumulation=True,
    description="LCL: a ViT trained through a causal LM on interleaved image-text data "
    "(contrastive image-vs-preceding-context plus generation of the following text)",
)
