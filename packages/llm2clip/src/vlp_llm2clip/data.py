"""Sample adapters: stage 2 (image + a precomputed caption embedding) and stage 1 (caption triples)."""

from __future__ import annotations

import random
from typing import Any

import torch

from vlp_core.data.adapters import parse_json, read_caption, read_image, seeded_augment
from vlp_core.data.transforms import build_transform
from vlp_core.method import SkipSample
from vlp_llm2clip.embed import EmbeddingIndex

__all__ = ["EmbeddingAdapter", "CaptionTripleAdapter", "swap_negative"]


class EmbeddingAdapter:
    """-> ``{"images", "text_emb" [B, E], "texts"}``: one caption key drawn per sample per visit (uniform)."""

    def __init__(self, index: EmbeddingIndex, *, caption_keys: list[str], image_size: int, augment: bool = False,
                 interpolation: str = "bilinear"):
        missing = [k for k in caption_keys if k not in index.caption_keys]
        if missing:
            raise ValueError(f"caption keys {missing} were not embedded in {index.folder} "
                             f"(it holds {index.caption_keys}); run llm2clip-embed with them")
        self.index = index
        self.keys = caption_keys
        self.transform = build_transform(image_size, train=True, augment=augment, interpolation=interpolation)
        self.augment = augment

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = random.Random(sample.get("__seed__", 0))
        key = rng.choice(self.keys)
        emb = self.index.lookup(sample["__url__"], sample["__key__"], key)
        caption = read_caption(sample, key, rng)
        with seeded_augment(rng, self.augment):
            image = read_image(sample, self.transform)
        return {"images": image, "text_emb": emb, "texts": caption}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return {"images": torch.stack([s["images"] for s in samples]),
                "text_emb": torch.stack([s["text_emb"] for s in samples]),
                "texts": [s["texts"] for s in samples]}


def swap_negative(sample: dict[str, Any], kind: str) -> str:
    """Shapes world hard negative: the ``clean``/``long`` caption of the same objects with the colours of the
    first two exchanged (the compositional negative), or, when they share a colour or there is one object,
    with the first object's colour replaced by the next colour."""
    from vlp_core.data.synthetic import COLORS, clean_caption, long_caption, swap_colors

    objects = parse_json(sample).get("objects")
    if not objects or not all(isinstance(o, dict) and "color" in o for o in objects):
        raise SkipSample("no_objects", "hard_negative='swap' needs json.objects")
    if len(objects) >= 2 and objects[0]["color"] != objects[1]["color"]:
        changed = swap_colors(objects)
    else:
        first = dict(objects[0])
        first["color"] = COLORS[(COLORS.index(first["color"]) + 1) % len(COLORS)] if first["color"] in COLORS \
            else COLORS[0]
        changed = [first, *objects[1:]]
    return long_caption(changed) if kind == "long" else clean_caption(changed)


class CaptionTripleAdapter:
    """Stage 1: ``(query, positive, hard negative)`` texts with instructions for the queries.

    Image-text samples: a coin flip picks short -> long (query = short caption with the short-to-long
    instruction) or long -> short. Text-only samples (no image, json with ``pair_query_key``): the pair as is.
    """

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    def _negative(self, sample: dict[str, Any], kind: str, rng: random.Random) -> str | None:
        hn = self.cfg.hard_negative
        if hn == "none":
            return None
        if hn == "swap":
            return swap_negative(sample, kind)
        return read_caption(sample, hn, rng)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        rng = random.Random(sample.get("__seed__", 0))
        if not any(k in sample for k in ("jpg", "jpeg", "png", "webp")) and "json" in sample:
            query = read_caption(sample, c.pair_query_key, rng)
            positive = read_caption(sample, c.pair_positive_key, rng)
            negative = None
            if c.hard_negative != "none":
                negative = read_caption(sample, c.pair_negative_key, rng)
            instruction = parse_json(sample).get("instruction", "")
            return {"q": query, "p": positive, "n": negative, "instruction": instruction}
        short, long = read_caption(sample, c.short_key, rng), read_caption(sample, c.long_key, rng)
        if rng.random() < 0.5:
            query, positive, kind, instruction = short, long, "long", c.short_to_long_instruction
        else:
            query, positive, kind, instruction = long, short, "short", c.long_to_short_instruction
        return {"q": query, "p": positive, "n": self._negative(sample, kind, rng), "instruction": instruction}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Token rows of the queries, positives and negatives, all cut to the batch's longest row (they are
        concatenated into one forward), not padded to the context length."""
        from vlp_llm2clip.encoder import tokenize, trim_rows

        pool_bos = self.cfg.pool_bos
        batch: dict[str, Any] = {}
        q = tokenize(self.tokenizer, [s["q"] for s in samples], [s["instruction"] for s in samples],
                     pool_bos=pool_bos)
        p = tokenize(self.tokenizer, [s["p"] for s in samples], pool_bos=pool_bos)
        parts = {"q": q, "p": p}
        negatives = [s["n"] for s in samples]
        if any(n is not None for n in negatives):
            if any(n is None for n in negatives):
                raise ValueError("a batch mixes samples with and without a hard negative")
            parts["n"] = tokenize(self.tokenizer, negatives, pool_bos=pool_bos)
        for name, enc in parts.items():
            for k, v in enc.items():
                batch[f"{name}_{k}"] = v
        batch["texts"] = [s["q"] for s in samples]
        return trim_rows(batch, tuple(f"{name}_" for name in parts))
