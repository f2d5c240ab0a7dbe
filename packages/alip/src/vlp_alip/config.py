"""ALIP's own settings: the ``loss`` section of its run config (``--set loss.<field>=...``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["AlipConfig"]


@dataclass(kw_only=True)
class AlipConfig:
    # Where the two texts of a sample live: a member ("txt", "syn.txt") or a json field ("json.clean").
    raw_key: str = "txt"
    caption_key: str = "syn.txt"
    # A sample without a synthetic caption: "skip" it, or use its raw text as the caption ("raw").
    missing_caption: Literal["skip", "raw"] = "skip"
    # One shared temperature for both paths; logit scale starts at ln(1/T), capped at max_logit_scale (the
    # stored scale clamped to [0, ln max_logit_scale] after every step, as the official code does).
    init_temperature: float = 0.07
    learn_temperature: bool = True
    max_logit_scale: float = 100.0
    # Gates (spec section 3): running averages H with momentum m, start value h_init (1.0 as in the code).
    momentum: float = 0.99
    h_init: float = 1.0
    gamma_s: float = 2.0  # Language Consistency Gate (sample weight W^s)
    gamma_p: float = 2.0  # Description Consistency Gate (pair weights W^t, W^c)
    # Which weights multiply the loss; all False = the ungated bi-path (sum of two CLIP losses).
    use_ws: bool = True
    use_wt: bool = True
    use_wc: bool = True

    def validate(self) -> None:
        if not self.raw_key.strip() or not self.caption_key.strip():
            raise ValueError(f"loss.raw_key ({self.raw_key!r}) and loss.caption_key ({self.caption_key!r}) "
                             "must both name a member or a json field")
        if self.init_temperature <= 0:
            raise ValueError(f"loss.init_temperature must be positive, got {self.init_temperature}")
        if not self.max_logit_scale >= 1:  # the scale is kept in [1, max_logit_scale] (vlp_core.losses.bounds)
            raise ValueError(f"loss.max_logit_scale must be >= 1, got {self.max_logit_scale}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"loss.momentum must be in [0, 1), got {self.momentum}")
        if self.gamma_s < 0 or self.gamma_p < 0:
            raise ValueError(f"loss.gamma_s ({self.gamma_s}) and loss.gamma_p ({self.gamma_p}) must be >= 0")
