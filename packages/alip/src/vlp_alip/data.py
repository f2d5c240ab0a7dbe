"""ALIP's sample adapter: one image, its raw text and its synthetic caption per sample.

Webdataset keys (spec section 6.3): the image (``jpg``/``jpeg``/``png``/``webp``), the raw text
(``loss.raw_key``, default the ``txt`` member) and the synthetic caption (``loss.caption_key``, default the
``syn.txt`` member, i.e. ``<key>.syn.txt`` in the tar; a json field such as ``json.clean`` works too). The
shapes world keeps its noisy raw caption in ``txt`` and its clean captioner-like caption in ``json.clean``;
its ``json.raw_is_noisy`` flag is passed on for logging only.
"""

from __future__ import annotations

from typing import Any

import torch

from vlp_core.data.adapters import ImageTextAdapter, parse_json, read_caption
from vlp_core.method import SkipSample

__all__ = ["AlipAdapter"]


class AlipAdapter(ImageTextAdapter):
    """-> ``images`` uint8 [B,3,S,S], ``texts``/``tokens`` (raw), ``captions``/``caption_tokens`` [B,L].

    Args:
        tokenizer: The run's tokenizer (fixed-length rows).
        image_size: Output image side.
        raw_key: Where the raw text lives (``txt`` or ``json.<field>``).
        caption_key: Where the synthetic caption lives (``syn.txt`` or ``json.<field>``).
        missing_caption: ``"skip"`` a sample without caption (counted as ``empty_caption``), or use its
            raw text as the caption (``"raw"``).
        augment: Random resized crop (the core's training augmentation).
    """

    def __init__(self, tokenizer: Any, *, image_size: int, raw_key: str = "txt", caption_key: str = "syn.txt",
                 missing_caption: str = "skip", augment: bool = False, interpolation: str = "bilinear") -> None:
        if missing_caption not in ("skip", "raw"):
            raise ValueError(f"missing_caption must be 'skip' or 'raw', got {missing_caption!r}")
        if "," in raw_key or "," in caption_key:
            raise ValueError(f"raw_key ({raw_key!r}) and caption_key ({caption_key!r}) each name one key")
        super().__init__(tokenizer, image_size=image_size, caption_keys=raw_key, augment=augment,
                         interpolation=interpolation)
        self.caption_key = caption_key.strip()
        self.missing_caption = missing_caption

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(sample)  # image and raw text
        try:
            out["captions"] = read_caption(sample, self.caption_key, self.rng(sample))
        except SkipSample as e:
            if self.missing_caption != "raw" or e.reason != "empty_caption":
                raise SkipSample(e.reason, f"synthetic caption: {e.detail}") from None
            out["captions"] = out["texts"]
        noisy = parse_json(sample).get("raw_is_noisy") if "json" in sample else None
        if isinstance(noisy, bool):
            out["raw_is_noisy"] = noisy
        return out

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate(samples)
        batch["captions"] = [s["captions"] for s in samples]
        batch["caption_tokens"] = self.tokenizer(batch["captions"])
        if all("raw_is_noisy" in s for s in samples):
            batch["raw_is_noisy"] = torch.tensor([s["raw_is_noisy"] for s in samples], dtype=torch.bool)
        return batch
