"""Llip's own settings (the ``loss`` section of its run config): cross-attention, loss and variant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["LlipConfig", "VARIANTS"]

# The paper's ablation ladder (SigLIP -> +Register -> +Average -> +Learned Average -> Llip), minus plain
# SigLIP, which is the core's ``clip`` method with ``loss.kind=siglip``.
VARIANTS = ("llip", "register", "avg", "learned_avg")


@dataclass(kw_only=True)
class LlipConfig:
    """The number of mixture tokens K is ``model.vision.extra_tokens``; the embedding dim D is ``model.embed_dim``.

    Variants: ``llip`` (text-conditioned mixture of the K tokens), ``register`` (SigLIP on the first of the
    K tokens, projected), ``avg`` (uniform average of the K per-token-projected tokens), ``learned_avg``
    (a learned, text-independent softmax average of them). The last three score with one image vector.
    """

    variant: Literal["llip", "register", "avg", "learned_avg"] = "llip"
    heads: int = 8  # cross-attention heads H (D must be divisible by H)
    tau: float = 5.0  # cross-attention temperature: scores are divided by tau only (no 1/sqrt(d))
    use_norm: bool = False  # LayerNorm(D) on K, Q and V (the H/14 and G/14 configs)
    init_logit_scale: float = math.log(1 / 0.07)
    init_bias: float = -10.0
    # Std of the K mixture tokens' initialisation; None: Llip's width**-0.5 (the official OpenAI-layout tower).
    token_init_std: float | None = None
    # How the mixture head starts: "random" (the paper: K independent key/value draws, out_proj at D**-0.5) or
    # "shared" (a demo choice: the K key/value projections start as copies of one draw, out_proj at the identity).
    head_init: Literal["random", "shared"] = "random"
    max_logit_scale: float = 100.0  # exp(logit_scale) is clamped to [1, max_logit_scale]
    chunk: int = 128  # side of the image x text blocks of the pairwise loss and of evaluation scoring
    checkpoint_blocks: bool = True  # recompute each block in backward instead of storing it
    ring: Literal["bidir", "shift"] = "bidir"  # how the text tensors travel between ranks
    # Where captions come from, comma-separated: a member ("txt") or a json field ("json.clean").
    caption_keys: str = "txt"

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"loss.variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.heads <= 0:
            raise ValueError(f"loss.heads must be positive, got {self.heads}")
        if not self.tau > 0:
            raise ValueError(f"loss.tau must be positive, got {self.tau}")
        if self.chunk <= 0:
            raise ValueError(f"loss.chunk must be positive, got {self.chunk}")
        if self.token_init_std is not None and not self.token_init_std >= 0:
            raise ValueError(f"loss.token_init_std must be >= 0 (or null for width**-0.5), got {self.token_init_std}")
        if self.head_init not in ("random", "shared"):
            raise ValueError(f"loss.head_init must be 'random' or 'shared', got {self.head_init!r}")
        if not self.max_logit_scale > 1:
            raise ValueError(f"loss.max_logit_scale must be > 1, got {self.max_logit_scale}")
