"""LCL's own settings (the ``loss`` section of its run config): loss weights, temperature, data rules."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LclConfig"]


@dataclass(kw_only=True)
class LclConfig:
    # Total loss: contrastive_weight * L_con + generation_weight * L_gen (official defaults 0.1 and 1.0).
    contrastive_weight: float = 0.1
    generation_weight: float = 1.0
    init_temperature: float = 0.07  # logit scale starts at ln(1 / T)
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # the stored scale is clamped to [0, ln max] after every step
    pool_heads: int = 8  # heads of the attentive pooling (head width = LM width / pool_heads)
    # Vocabulary-head chunk: target tokens per chunk of the generation loss (the head is recomputed in backward).
    gen_chunk: int = 4096
    # Pairs: where the caption lives (comma-separated keys, as in vlp_core's ImageTextAdapter).
    caption_keys: str = "txt"
    img_first_prob: float = 0.5  # a pair becomes <image> caption (captioning) with this probability
    # Documents (MMC4 format): similarity filter, image cap, placement.
    sim_threshold: float = 0.24
    max_images: int = 6
    min_images: int = 1
    image_before_prob: float = 0.5  # an image goes before its matched sentence with this probability
    # An image gets a contrastive pair only when at least this many text tokens precede it (explicit flag).
    min_context_tokens: int = 1
    # text.kind='hf': build the transformers causal LM from its config (random weights) instead of loading.
    hf_random_init: bool = False

    def validate(self) -> None:
        if self.init_temperature <= 0:
            raise ValueError(f"loss.init_temperature must be positive, got {self.init_temperature}")
        if not self.max_logit_scale >= 1:  # the scale is kept in [1, max_logit_scale] (vlp_core.losses.bounds)
            raise ValueError(f"loss.max_logit_scale must be >= 1, got {self.max_logit_scale}")
        if self.contrastive_weight < 0 or self.generation_weight < 0:
            raise ValueError(
                f"loss.contrastive_weight ({self.contrastive_weight}) and loss.generation_weight "
                f"({self.generation_weight}) must be >= 0"
            )
        for name in ("img_first_prob", "image_before_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"loss.{name} must be in [0, 1], got {value}")
        if self.max_images < 1 or not 1 <= self.min_images <= self.max_images:
            raise ValueError(
                f"loss.max_images ({self.max_images}) must be >= 1 and loss.min_images ({self.min_images}) "
                "in [1, max_images]"
            )
        if self.gen_chunk < 1 or self.pool_heads < 1 or self.min_context_tokens < 0:
            raise ValueError("loss.gen_chunk and loss.pool_heads must be >= 1, loss.min_context_tokens >= 0")
