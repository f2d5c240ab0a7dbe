"""Data adapters shared by methods: image + caption(s) from a webdataset sample.

A caption key names where a caption lives: a member (``txt``) or a field of the ``json`` member
(``json.clean``); a list-valued field (``json.captions``) contributes one random element. With several keys
the adapter draws one per sample, from a generator seeded by the pipeline for that sample, so the choice is
the same after a resume.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from typing import Any

import torch

from vlp_core.data.transforms import ImageDecodeError, build_transform, decode_image
from vlp_core.method import SkipSample

__all__ = ["ImageTextAdapter", "read_caption", "read_image", "read_npy", "parse_json", "seeded_augment",
           "IMAGE_KEYS"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def parse_json(sample: dict[str, Any]) -> dict[str, Any]:
    if "__json__" not in sample:
        raw = sample.get("json")
        try:
            sample["__json__"] = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise SkipSample("bad_json", str(e)) from None
    return sample["__json__"]


def read_caption(sample: dict[str, Any], key: str, rng: random.Random) -> str:
    """The caption under ``key`` (``txt`` or ``json.<field>``); raises SkipSample when absent or empty."""
    if key.startswith("json."):
        value: Any = parse_json(sample)
        for part in key[5:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, list):
            value = rng.choice(value) if value else None
    else:
        raw = sample.get(key)
        try:
            value = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            raise SkipSample("bad_caption", f"{key} is not UTF-8") from None
    if not isinstance(value, str) or not value.strip():
        raise SkipSample("empty_caption", f"no caption under '{key}'")
    return value.strip()


@contextlib.contextmanager
def seeded_augment(rng: random.Random, enabled: bool) -> Iterator[None]:
    """Random image transforms run inside draw from torch's RNG seeded from ``rng`` (the sample's own
    generator), so a sample gets the same crop after a resume; the global RNG is left untouched. A no-op
    (and no draw from ``rng``) when ``enabled`` is false."""
    if not enabled:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng.getrandbits(31))
        yield


def read_image(sample: dict[str, Any], transform) -> torch.Tensor:
    for key in IMAGE_KEYS:
        if key in sample:
            try:
                return transform(decode_image(sample[key]))
            except ImageDecodeError as e:
                raise SkipSample("bad_image", f"{key}: {e}") from None
    raise SkipSample("no_image", f"no member among {IMAGE_KEYS}")


class ImageTextAdapter:
    """One image and one caption per sample -> ``{"images": uint8 [B,3,S,S], "tokens": [B,L], "texts"}``.

    ``interpolation`` (``model.vision.interpolation``: "bilinear" or "bicubic") is the resize mode of the
    image transform; normalisation happens later, on the device (``prepare_images``).
    """

    def __init__(self, tokenizer: Any, *, image_size: int, caption_keys: str = "txt", augment: bool = False,
                 interpolation: str = "bilinear"):
        self.tokenizer = tokenizer
        self.keys = [k.strip() for k in caption_keys.split(",") if k.strip()]
        if not self.keys:
            raise ValueError("caption_keys is empty")
        self.transform = build_transform(image_size, train=True, augment=augment, interpolation=interpolation)
        self.augment = augment

    def rng(self, sample: dict[str, Any]) -> random.Random:
        return random.Random(sample.get("__seed__", 0))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = self.rng(sample)
        caption = read_caption(sample, rng.choice(self.keys), rng)
        with seeded_augment(rng, self.augment):
            image = read_image(sample, self.transform)
        return {"images": image, "texts": caption}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [s["texts"] for s in samples]
        return {"images": torch.stack([s["images"] for s in samples]), "texts": texts,
                "tokens": self.tokenizer(texts)}


def read_npy(sample: dict[str, Any], key: str = "npy") -> torch.Tensor:
    """A precomputed array member (``<key>.npy``, e.g. text embeddings) as a float tensor."""
    import io

    import numpy as np

    if key not in sample:
        raise SkipSample("missing_member", f"no '{key}' member")
    try:
        return torch.from_numpy(np.load(io.BytesIO(sample[key]), allow_pickle=False)).float()
    except (ValueError, OSError) as e:
        raise SkipSample("bad_array", f"{key}: {e}") from None
