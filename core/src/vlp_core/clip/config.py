"""The CLIP/SigLIP baseline's own settings (the ``loss`` section of its run config)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["ClipConfig"]


@dataclass(kw_only=True)
class ClipConfig:
    kind: Literal["infonce", "siglip"] = "infonce"
    init_temperature: float = 0.07  # InfoNCE: logit scale starts at ln(1 / T)
    siglip_init_logit_scale: float = math.log(10.0)
    siglip_init_bias: float = -10.0
    learn_temperature: bool = True
    # exp(logit_scale) is capped in the forward pass, and the stored scale clamped to [0, ln max] after each step.
    max_logit_scale: float = 100.0
    # Where captions come from, comma-separated: a member ("txt") or a json field ("json.clean").
    caption_keys: str = "txt"

    def validate(self) -> None:
        if self.init_temperature <= 0:
            raise ValueError(f"loss.init_temperature must be positive, got {self.init_temperature}")
        if not self.max_logit_scale >= 1:  # the scale is kept in [1, max_logit_scale] (vlp_core.losses.bounds)
            raise ValueError(f"loss.max_logit_scale must be >= 1, got {self.max_logit_scale}")
