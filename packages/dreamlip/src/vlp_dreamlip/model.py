"""The DreamLIP dual encoder: the core's ``DualEncoder`` plus projected patch tokens and T texts per image.

Legend: B batch, T texts per image (raw + K sub-captions), L context length, N patches, D embedding dim.
"""

from __future__ import annotations

from typing import Any

import torch

from vlp_core.config import ModelConfig
from vlp_core.models.dual import DualEncoder

__all__ = ["DreamLipModel"]


class DreamLipModel(DualEncoder):
    """``forward(batch)`` returns unnormalised ``image_features`` [B, D], ``text_features`` [B, T, D] and,
    with ``patch_features=True``, ``patch_features`` [B, N, D].

    Patch tokens (after the tower's final norm) go through the same projection head as the pooled token,
    so they live in the joint space (the official code reinterprets the unprojected 768-d tokens as 512-d).
    Evaluation uses the inherited ``encode_image`` / ``encode_text``.
    """

    def __init__(
        self, cfg: ModelConfig, *, vocab_size: int, pad_id: int, eot_id: int | None = None, bos_id: int | None = None,
        patch_features: bool = True,
    ) -> None:
        super().__init__(cfg, vocab_size=vocab_size, pad_id=pad_id, eot_id=eot_id, bos_id=bos_id)
        self.patch_features = patch_features

    def encode_image_patches(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected pooled image features [B, D] and projected patch tokens [B, N, D]."""
        out = self.visual(images_BCHW)
        return self.image_proj(out.pooled), self.image_proj(out.patches)

    def encode_texts(self, tokens_BTL: torch.Tensor) -> torch.Tensor:
        """Text features [B, T, D] for T texts per image (one text-tower pass over all B * T)."""
        if tokens_BTL.ndim == 2:
            tokens_BTL = tokens_BTL[:, None]
        b, t, length = tokens_BTL.shape
        return self.encode_text(tokens_BTL.reshape(b * t, length)).view(b, t, -1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {"text_features": self.encode_texts(batch["tokens"])}
        if self.patch_features:
            out["image_features"], out["patch_features"] = self.encode_image_patches(batch["images"])
        else:
            out["image_features"] = self.encode_image(batch["images"])
        return out
