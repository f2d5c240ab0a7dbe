"""Shared test helpers: tiny configs and hand-made raw samples (pairs and MMC4-style documents)."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from vlp_lcl import METHOD

from vlp_core.config import RunConfig


def tiny_cfg(context_length: int = 96) -> RunConfig:
    cfg = METHOD.preset("smoke")  # 32 px, patch 16: 4 visual tokens per image
    cfg.model.text.context_length = context_length
    return cfg


def jpeg(seed: int, size: int = 32) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def pair(seed: int, caption: str = "a red circle at the top left.") -> dict:
    return {"__key__": f"p{seed}", "__seed__": seed, "jpg": jpeg(seed), "txt": caption.encode(),
            "json": json.dumps({"clean": caption}).encode()}


def document(seed: int, sentences: list[str], images: list[tuple[int, float]]) -> dict:
    """``images``: (matched_text_index, matched_sim) per image, named img<k>.jpg."""
    sample = {"__key__": f"d{seed}", "__seed__": seed}
    info = []
    for k, (idx, sim) in enumerate(images):
        sample[f"img{k}.jpg"] = jpeg(1000 * seed + k)
        info.append({"image_name": f"img{k}.jpg", "matched_text_index": idx, "matched_sim": sim})
    sample["json"] = json.dumps({"text_list": sentences, "image_info": info}).encode()
    return sample


SENTENCES = ["there are two objects.", "a small red circle is on the left.", "a large blue star is at the top.",
             "what do you think?", "the red circle is below the blue star.", "thanks for reading!",
             "here is another one.", "more photos below."]
