"""vlp-llip: Llip (Latent Language Image Pre-training), plugged into the core through ``MethodSpec``."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from torch import nn

from vlp_core.config import RunConfig
from vlp_core.data.adapters import ImageTextAdapter
from vlp_core.method import MethodSpec
from vlp_llip.config import VARIANTS, LlipConfig
from vlp_llip.convert import LLIP_READER  # registers the reader of Llip's released checkpoints (vlp-convert)
from vlp_llip.loss import LlipLoss, llip_loss
from vlp_llip.model import LlipModel
from vlp_llip.presets import PRESETS
from vlp_llip.scorer import LlipScorer, build_scorer

try:
    __version__ = version("vlp-llip")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["METHOD", "LlipConfig", "LlipModel", "LlipLoss", "LlipScorer", "VARIANTS", "llip_loss",
           "LLIP_READER", "build_model", "build_loss", "build_adapter", "build_scorer", "__version__"]


def _llip_config(cfg: RunConfig) -> LlipConfig:
    if not isinstance(cfg.loss, LlipConfig):
        raise ValueError(f"the llip method needs a LlipConfig in cfg.loss, got {type(cfg.loss).__name__}")
    return cfg.loss


def build_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    return LlipModel(cfg.model, _llip_config(cfg), vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                     eot_id=tokenizer.eot_id, bos_id=tokenizer.bos_id)


def build_loss(cfg: RunConfig) -> nn.Module:
    return LlipLoss(_llip_config(cfg))


def build_adapter(cfg: RunConfig, tokenizer: Any) -> ImageTextAdapter:
    return ImageTextAdapter(tokenizer, image_size=cfg.model.vision.image_size,
                            caption_keys=_llip_config(cfg).caption_keys, augment=cfg.data.augment,
                            interpolation=cfg.model.vision.interpolation)


METHOD = MethodSpec(
    name="llip",
    config_cls=LlipConfig,
    presets=PRESETS,
    build_model=build_model,
    build_loss=build_loss,
    build_adapter=build_adapter,
    build_scorer=build_scorer,
    # Every feature is batch-first (image keys/values, text query/target, or the factorised variants' two
    # embeddings) and the loss divides by the merged rank batch: exact accumulation gives the whole batch.
    exact_accumulation=True,
    description="Llip: K mixture tokens pooled by each caption's query, with a pairwise sigmoid loss",
)
