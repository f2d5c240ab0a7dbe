"""ALIP's model: the core dual encoder, its one text tower run once over raw texts and captions together.

Legend: B batch, L context length, D embedding dim.
"""

from __future__ import annotations

from typing import Any

import torch

from vlp_core.models.dual import DualEncoder

__all__ = ["AlipModel"]


class AlipModel(DualEncoder):
    """``forward(batch)`` -> unnormalised ``image_features``, ``text_features`` (raw) and ``caption_features``.

    The raw-text tokens ``batch["tokens"]`` and the caption tokens ``batch["caption_tokens"]`` (both
    ``[B, L]``) go through the shared text tower as one ``[2B, L]`` batch: the same result as two passes
    (no op mixes rows), one kernel launch sequence instead of two. Evaluation uses the inherited
    ``encode_image`` / ``encode_text``.
    """

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raw_BL, cap_BL = batch["tokens"], batch["caption_tokens"]
        if raw_BL.shape != cap_BL.shape:
            raise ValueError(f"raw-text tokens {tuple(raw_BL.shape)} and caption tokens {tuple(cap_BL.shape)} "
                             "must have the same [B, L] shape")
        text_2BD = self.encode_text(torch.cat([raw_BL, cap_BL], dim=0))
        text_BD, caption_BD = text_2BD.split(raw_BL.shape[0], dim=0)
        return {"image_features": self.encode_image(batch["images"]), "text_features": text_BD,
                "caption_features": caption_BD}
