"""DreamLIP (Zheng et al., ECCV 2024): language-image pre-training with long captions, on vlp-core.

Sub-captions sampled from MLLM long/short captions, the per-slot multi-positive contrastive loss and the
sub-caption grouping loss, plugged into the core through :class:`vlp_core.method.MethodSpec`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlp_core.config import RunConfig
from vlp_core.method import MethodSpec
from vlp_dreamlip.config import DreamLipConfig
from vlp_dreamlip.data import DreamLipAdapter
from vlp_dreamlip.loss import DreamLipLoss
from vlp_dreamlip.model import DreamLipModel
from vlp_dreamlip.presets import PRESETS
from vlp_dreamlip.visualize import visualize

__version__ = "0.1.0"
__all__ = ["METHOD", "DreamLipConfig", "DreamLipAdapter", "DreamLipLoss", "DreamLipModel", "build_model",
           "build_loss", "build_adapter", "__version__"]


def build_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    return DreamLipModel(cfg.model, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                         eot_id=tokenizer.eot_id, bos_id=tokenizer.bos_id,
                         patch_features=cfg.loss.sgl_weight > 0)


def build_loss(cfg: RunConfig) -> nn.Module:
    return DreamLipLoss(cfg.loss)


def build_adapter(cfg: RunConfig, tokenizer: Any) -> DreamLipAdapter:
    c = cfg.loss
    return DreamLipAdapter(tokenizer, image_size=cfg.model.vision.image_size, raw_key=c.raw_key,
                           caption_keys=c.caption_keys, num_subcaptions=c.num_subcaptions,
                           augment=cfg.data.augment, trim_padding=c.trim_padding,
                           interpolation=cfg.model.vision.interpolation)


METHOD = MethodSpec(
    name="dreamlip",
    config_cls=DreamLipConfig,
    presets=PRESETS,
    build_model=build_model,
    build_loss=build_loss,
    build_adapter=build_adapter,
    visualize=visualize,
    # The loss couples the batch's samples: with train.accum_steps > 1 one step gives the whole batch's gradient.
    exact_accumulation=True,
    description="DreamLIP: long-caption sub-caption sampling, multi-positive contrastive and sub-caption "
    "grouping losses",
)
