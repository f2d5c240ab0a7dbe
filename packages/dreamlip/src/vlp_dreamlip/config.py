"""DreamLIP's own settings (the ``loss`` section of its run config): data sampling and the two losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DreamLipConfig", "RELEASE_CAPTION_KEYS", "SHAREGPT4V_CAPTION_KEYS"]

# The caption columns of the official release, as ``dreamlip-prepare`` (and img2dataset with
# ``--save_additional_columns``) stores them in each sample's json, in the official CsvDataset's pool order.
RELEASE_CAPTION_KEYS = ",".join(
    f"json.{c}"
    for c in ("shortIB_captions", "longIB_captions", "shortSV_captions", "longSV_captions",
              "shortLLA_captions", "longLLA_captions")
)
# The released checkpoints were trained on the ShareGPT4V captions only.
SHAREGPT4V_CAPTION_KEYS = "json.shortSV_captions,json.longSV_captions"


@dataclass(kw_only=True)
class DreamLipConfig:
    # Data. ``raw_key``: the raw (alt-text) caption, always text slot 0. ``caption_keys``: the captioners'
    # outputs (members or ``json.<field>``, comma-separated); all their sentences form the pool that the K
    # sub-captions are drawn from each time a sample is loaded.
    raw_key: str = "txt"
    caption_keys: str = "json.long,json.clean"
    num_subcaptions: int = 8  # K; T = K + 1 texts per image
    trim_padding: bool = True  # tokens cut to the batch's longest text (exact: pads never reach real tokens)
    # Global multi-positive contrastive loss (per caption slot, against all images of the global batch).
    mpcl_weight: float = 1.0
    init_temperature: float = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
    # Sub-caption grouping loss. 0 turns it off (and the patch projection with it).
    sgl_weight: float = 1.0
    sgl_sigma: float = 0.0  # threshold on the min-max normalised patch weights (official default 0)
    # "image": negatives are the other sub-captions' groupings of the same image (the paper's form);
    # "global": symmetric InfoNCE over all sub-captions of the global batch (the official code's choice).
    sgl_negatives: Literal["image", "global"] = "image"
    sgl_init_temperature: float = 0.07  # its own learnable temperature
    mask_duplicates: bool = True  # duplicate sub-captions of one image are neither negatives nor re-counted

    def validate(self) -> None:
        if self.num_subcaptions < 0:
            raise ValueError(f"loss.num_subcaptions must be >= 0, got {self.num_subcaptions}")
        if not 0.0 <= self.sgl_sigma < 1.0:
            raise ValueError(f"loss.sgl_sigma must be in [0, 1), got {self.sgl_sigma}")
        for name in ("init_temperature", "sgl_init_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"loss.{name} must be positive, got {getattr(self, name)}")
        if not self.max_logit_scale >= 1:  # the scales are kept in [1, max_logit_scale] (vlp_core.losses.bounds)
            raise ValueError(f"loss.max_logit_scale must be >= 1, got {self.max_logit_scale}")
        for name in ("mpcl_weight", "sgl_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.raw_key.strip():
            raise ValueError("loss.raw_key is empty")
        if self.num_subcaptions and not [k for k in self.caption_keys.split(",") if k.strip()]:
            raise ValueError("loss.caption_keys is empty but loss.num_subcaptions > 0")
