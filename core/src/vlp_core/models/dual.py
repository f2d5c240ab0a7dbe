"""A dual encoder: image tower and text tower, each with a projection into a shared space.

The projections are ``model.image_proj`` / ``model.text_proj``: ``linear`` (bias-free, CLIP), ``linear_bias``
(EVA-CLIP's image head, SigLIP's text head) or ``none`` (the tower's pooled feature is the embedding:
SigLIP's MAP head).

Legend: B batch, C channels, H/W image size, L context length, D embedding dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp_core.config import ModelConfig
from vlp_core.models.text import build_text_tower
from vlp_core.models.vit import build_vision_tower

__all__ = ["DualEncoder", "build_projection"]


def build_projection(kind: str, width: int, embed_dim: int, *, name: str) -> nn.Module:
    """``linear`` / ``linear_bias`` (``std = width**-0.5`` init, zero bias) or ``none`` (identity)."""
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"model.{name}='none' needs the tower width ({width}) to equal embed_dim ({embed_dim})")
        return nn.Identity()
    if kind not in ("linear", "linear_bias"):
        raise ValueError(f"model.{name} must be 'linear', 'linear_bias' or 'none', got {kind!r}")
    proj = nn.Linear(width, embed_dim, bias=kind == "linear_bias")
    nn.init.normal_(proj.weight, std=width**-0.5)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    return proj


class DualEncoder(nn.Module):
    """``forward(batch)`` returns unnormalised ``image_features`` [B, D] and ``text_features`` [B, D].

    Args:
        cfg: Model config.
        vocab_size, pad_id, eot_id, bos_id: The tokenizer's (see :func:`build_text_tower`).
    """

    def __init__(
        self, cfg: ModelConfig, *, vocab_size: int, pad_id: int, eot_id: int | None = None,
        bos_id: int | None = None,
    ) -> None:
        super().__init__()
        self.visual = build_vision_tower(cfg.vision)
        self.text = build_text_tower(cfg.text, vocab_size=vocab_size, pad_id=pad_id, eot_id=eot_id, bos_id=bos_id)
        self.image_proj = build_projection(cfg.image_proj, self.visual.width, cfg.embed_dim, name="image_proj")
        self.text_proj = build_projection(cfg.text_proj, self.text.width, cfg.embed_dim, name="text_proj")

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.visual(images_BCHW).pooled)

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text(tokens_BL).pooled)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(batch["images"]),
            "text_features": self.encode_text(batch["tokens"]),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if hasattr(self.text, "set_grad_checkpointing"):
            self.text.set_grad_checkpointing(enable)
