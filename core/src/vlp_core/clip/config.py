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
    max_logit_scale: float = 100.0
    # Where captions come from, comma-separated: a member ("txt") or a json field ("json.clean").
    caption_keys: str = "txt"

    def validate(self) -> None:
        if self.init_temperature <= 0:
            raise ValueError(f"loss.init_temperature must be positive, got {self.init_temperature}")
