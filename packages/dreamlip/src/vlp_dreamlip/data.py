"""DreamLIP data: sentence splitting, per-step sub-caption sampling and the sample adapter.

Each sample gives T = K + 1 texts: the raw caption (slot 0) and K sub-captions drawn afresh every time the
sample is loaded (the pipeline seeds each load differently, and identically after a resume) from the pool
of sentences of all captioner outputs. Draws are without replacement when the pool has at least K
sentences; a smaller pool is used whole and topped up with repeats, which ``caption_ids`` marks so the
losses can mask them.
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch

from vlp_core.data.adapters import ImageTextAdapter, parse_json
from vlp_core.method import SkipSample

__all__ = ["split_sentences", "sample_subcaptions", "duplicate_ids", "DreamLipAdapter"]

# Words whose period does not end a sentence ("Mr. Smith", "approx. 3"); "etc." usually does, so it is absent.
_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "no", "fig", "approx", "dept", "est", "inc",
     "ltd", "co", "mt", "ave"]
)
_INITIALISM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]|[A-Z]")  # "U.S" of "U.S.", "e.g" of "e.g.", an initial
_HARD_BREAK = re.compile(r"\n|</s>")
# Sentence-final punctuation: followed by whitespace (optionally after a closing quote/bracket) or the end.
# A period between digits ("3.5") or inside a word ("example.com") is never followed by whitespace.
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def _is_abbreviation(word: str) -> bool:
    word = word.lstrip("(\"'[")
    return word.lower() in _ABBREVIATIONS or bool(_INITIALISM.fullmatch(word))


def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences, keeping their final punctuation.

    Breaks at newlines, ``</s>`` and sentence-final ``.``/``!``/``?`` followed by whitespace or the end, but
    not after abbreviations ("Mr.", "Dr."), initialisms ("U.S.", "e.g.") or inside numbers ("3.5").
    Empty pieces are dropped; an empty or whitespace-only caption gives ``[]``.
    """
    out: list[str] = []
    for piece in _HARD_BREAK.split(text or ""):
        start = 0
        for m in _END.finditer(piece):
            words = piece[start : m.start()].split()
            if m.group().startswith(".") and len(m.group().rstrip("\"')]")) == 1 and words \
                    and _is_abbreviation(words[-1]):
                continue
            sentence = piece[start : m.end()].strip()
            if sentence:
                out.append(sentence)
            start = m.end()
        rest = piece[start:].strip()
        if rest:
            out.append(rest)
    return out


def sample_subcaptions(pool: list[str], k: int, rng: random.Random, *, fallback: str) -> list[str]:
    """``k`` sub-captions from ``pool``: without replacement when ``len(pool) >= k``.

    A pool smaller than ``k`` is used whole and topped up with uniform repeats (in a shuffled order); an
    empty pool gives ``k`` copies of ``fallback`` (the raw caption), which :func:`duplicate_ids` marks as
    duplicates. Every sentence of the pool can be drawn (the official ``draw_numbers(len(pool) - 1, k)``
    never draws the last one and crashes on a one-sentence pool).
    """
    n = len(pool)
    if k <= 0:
        return []
    if n == 0:
        return [fallback] * k
    if n >= k:
        return [pool[i] for i in rng.sample(range(n), k)]
    idx = list(range(n)) + [rng.randrange(n) for _ in range(k - n)]
    rng.shuffle(idx)
    return [pool[i] for i in idx]


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".!? ")


def duplicate_ids(captions: list[str]) -> list[int]:
    """For each caption, the index of the first caption equal to it (case, spaces and final stop ignored).

    ``ids[j] == j`` marks a first occurrence; slots with equal ids hold the same text.
    """
    first: dict[str, int] = {}
    return [first.setdefault(_norm(c), j) for j, c in enumerate(captions)]


def _read_field(sample: dict[str, Any], key: str) -> list[str]:
    """All caption strings under ``key`` (``json.<field>`` or a member); absent or empty gives ``[]``."""
    if key.startswith("json."):
        value: Any = parse_json(sample)
        for part in key[5:].split("."):
            value = value.get(part) if isinstance(value, dict) else None
    else:
        value = sample.get(key)
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                raise SkipSample("bad_caption", f"{key} is not UTF-8") from None
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, str) and v.strip()]


class DreamLipAdapter(ImageTextAdapter):
    """Image, raw caption and K sampled sub-captions.

    Collates to ``images`` uint8 [B, 3, S, S], ``tokens`` [B, T, L] (slot 0 = raw caption; with
    ``trim_padding`` L is the batch's longest text, at most the context length), ``caption_ids``
    [B, T] (see :func:`duplicate_ids`), ``texts`` (the raw captions, for the sample grid) and
    ``subcaptions`` (the T strings of each sample).
    """

    def __init__(self, tokenizer: Any, *, image_size: int, raw_key: str = "txt",
                 caption_keys: str = "json.long,json.clean", num_subcaptions: int = 8,
                 augment: bool = False, trim_padding: bool = True, interpolation: str = "bilinear") -> None:
        super().__init__(tokenizer, image_size=image_size, caption_keys=raw_key, augment=augment,
                         interpolation=interpolation)
        self.pool_keys = [k.strip() for k in caption_keys.split(",") if k.strip()]
        self.k = num_subcaptions
        self.trim_padding = trim_padding

    def pool(self, sample: dict[str, Any]) -> list[str]:
        """Sentences of every captioner output, in ``caption_keys`` order."""
        return [s for key in self.pool_keys for text in _read_field(sample, key) for s in split_sentences(text)]

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(sample)  # image and raw caption, reused from the core
        # A generator of its own, derived from the sample's seed: a fresh draw at every load of the sample.
        rng = random.Random(f"dreamlip-{sample.get('__seed__', 0)}")
        captions = [out["texts"], *sample_subcaptions(self.pool(sample), self.k, rng, fallback=out["texts"])]
        return {"images": out["images"], "texts": out["texts"], "subcaptions": captions,
                "caption_ids": torch.tensor(duplicate_ids(captions), dtype=torch.long)}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        b, t = len(samples), self.k + 1
        tokens_ML = self.tokenizer([c for s in samples for c in s["subcaptions"]])
        if self.trim_padding:
            # Drop the columns that are padding in every row: sentences are far shorter than a context
            # sized for whole long captions, and right pads change nothing (causal tower, masked pooling).
            real_L = (tokens_ML != self.tokenizer.pad_id).any(0)
            tokens_ML = tokens_ML[:, : int(real_L.nonzero().max()) + 1 if real_L.any() else 1]
        return {
            "images": torch.stack([s["images"] for s in samples]),
            "tokens": tokens_ML.view(b, t, -1),
            "caption_ids": torch.stack([s["caption_ids"] for s in samples]),
            "texts": [s["texts"] for s in samples],
            "subcaptions": [s["subcaptions"] for s in samples],
        }
