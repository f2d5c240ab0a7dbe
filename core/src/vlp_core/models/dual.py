"""A dual encoder: image tower and text tower, each with a bias-free projection into a shared space.

Legend: B batch, C channels, H/W image size, L context length, D embedding dim.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp_core.config import ModelConfig
from vlp_core.models.text import build_text_tower
from vlp_core.models.vit import build_vision_tower

__all__ = ["DualEncoder"]


class DualEncoder(nn.Module):
    """``forward(batch)`` returns unnormalised ``image_features`` [B, D] and ``text_features`` [B, D]."""

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, pad_id: int) -> None:
        super().__init__()
        self.visual = build_vision_tower(cfg.vision)
        self.text = build_text_tower(cfg.text, vocab_size=vocab_size, pad_id=pad_id)
        self.image_proj = nn.Linear(self.visual.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=self.visual.width**-0.5)
        nn.init.normal_(self.text_proj.weight, std=self.text.width**-0.5)

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
