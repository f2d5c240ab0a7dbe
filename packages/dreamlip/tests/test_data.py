"""Sentence splitting, sub-caption sampling and the adapter, on edge cases."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from vlp_dreamlip.data import DreamLipAdapter, duplicate_ids, sample_subcaptions, split_sentences

from vlp_core.data.synthetic import long_sentences, sample_objects
from vlp_core.method import SkipSample


@pytest.mark.parametrize("text, want", [
    ("A dog runs.", ["A dog runs."]),
    ("A dog runs", ["A dog runs"]),  # one sentence without a final stop
    ("", []), ("   \n  ", []),  # empty captions
    ("Mr. Smith walks a dog. It is big.", ["Mr. Smith walks a dog.", "It is big."]),
    ("He moved to the U.S. in 1990. Then he left.", ["He moved to the U.S. in 1990.", "Then he left."]),
    ("The bottle holds 3.5 litres. It is green.", ["The bottle holds 3.5 litres.", "It is green."]),
    ("Fruit, e.g. apples, lie here. Dr. No waits!", ["Fruit, e.g. apples, lie here.", "Dr. No waits!"]),
    ("Is it red? Yes! It is.", ["Is it red?", "Yes!", "It is."]),
    ("Line one\nline two</s>three.", ["Line one", "line two", "three."]),
    ("He said \"stop.\" Then ran.", ["He said \"stop.\"", "Then ran."]),
    ("Wait... what.", ["Wait...", "what."]),
    ("see example.com for more", ["see example.com for more"]),
])
def test_split_sentences(text, want):
    assert split_sentences(text) == want


def test_split_recovers_the_shapes_world_sentences():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3):
        sentences = long_sentences(sample_objects(rng, n))
        assert split_sentences(" ".join(sentences)) == sentences


def test_sampling_without_replacement_reaches_every_sentence():
    pool = [f"s{i}" for i in range(6)]
    seen = Counter()
    for seed in range(400):
        got = sample_subcaptions(pool, 4, random.Random(seed), fallback="raw")
        assert len(got) == 4 and len(set(got)) == 4 and set(got) <= set(pool)
        seen.update(got)
    assert set(seen) == set(pool)  # the last sentence too (the official draw_numbers never picks it)
    assert min(seen.values()) > 0.5 * max(seen.values())  # roughly uniform


def test_sampling_small_pools():
    rng = random.Random(0)
    assert sample_subcaptions(["only"], 3, rng, fallback="raw") == ["only"] * 3  # one sentence: no crash
    assert sorted(sample_subcaptions(["a", "b"], 2, rng, fallback="raw")) == ["a", "b"]  # exactly K
    for seed in range(50):
        got = sample_subcaptions(["a", "b", "c"], 5, random.Random(seed), fallback="raw")
        assert len(got) == 5 and set(got) == {"a", "b", "c"}  # fewer than K: all of them, then repeats
    assert sample_subcaptions([], 2, rng, fallback="raw") == ["raw", "raw"]  # empty pool
    assert sample_subcaptions(["a"], 0, rng, fallback="raw") == []


def test_duplicate_ids():
    assert duplicate_ids(["A cat.", "a dog", "a cat", "A  dog.", "x"]) == [0, 1, 0, 1, 4]


def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class _Tok:
    """Whitespace tokenizer stand-in: one id per word, padded to 12."""

    vocab_size, pad_id = 100, 0

    def __call__(self, texts):
        rows = [[hash(w) % 97 + 1 for w in t.split()][:12] for t in texts]
        return torch.tensor([r + [0] * (12 - len(r)) for r in rows])


def _sample(seed, long="One. Two. Three. Four.", raw="raw caption"):
    return {"__key__": "k", "__seed__": seed, "jpg": _jpg(), "txt": raw.encode(),
            "json": json.dumps({"long": long, "clean": "a clean one."}).encode()}


def test_adapter_draws_fresh_subcaptions_per_load():
    ad = DreamLipAdapter(_Tok(), image_size=32, caption_keys="json.long,json.clean", num_subcaptions=3)
    assert ad.pool(_sample(0)) == ["One.", "Two.", "Three.", "Four.", "a clean one."]
    a, a2, b = ad(_sample(1)), ad(_sample(1)), ad(_sample(2))
    assert a["subcaptions"][0] == "raw caption" and len(a["subcaptions"]) == 4
    assert a["subcaptions"] == a2["subcaptions"]  # same seed (a resumed run) -> same draw
    draws = {tuple(ad(_sample(s))["subcaptions"]) for s in range(30)}
    assert len(draws) > 10  # dynamic sampling across loads
    batch = ad.collate([a, b])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["images"].dtype == torch.uint8
    full = _Tok()([c for s in (a, b) for c in s["subcaptions"]]).view(2, 4, 12)
    longest = max(len(c.split()) for s in (a, b) for c in s["subcaptions"])
    assert batch["tokens"].shape == (2, 4, longest) and longest < 12  # cut to the longest text
    assert torch.equal(batch["tokens"], full[..., :longest]) and not full[..., longest:].any()
    assert torch.equal(batch["tokens"][1, 2], full[1, 2, :longest])  # (image, slot) order
    untrimmed = DreamLipAdapter(_Tok(), image_size=32, num_subcaptions=3, trim_padding=False)
    assert torch.equal(untrimmed.collate([a, b])["tokens"], full)
    assert batch["caption_ids"].tolist() == [[0, 1, 2, 3]] * 2 and batch["texts"] == ["raw caption"] * 2


def test_adapter_marks_repeats_and_empty_pools():
    ad = DreamLipAdapter(_Tok(), image_size=32, caption_keys="json.long", num_subcaptions=4)
    out = ad(_sample(0, long="Just one."))
    assert out["subcaptions"][1:] == ["Just one."] * 4 and out["caption_ids"].tolist() == [0, 1, 1, 1, 1]
    out = ad(_sample(0, long=""))  # no captioner output: the raw caption fills in, all repeats
    assert out["subcaptions"] == ["raw caption"] * 5 and out["caption_ids"].tolist() == [0] * 5
    with pytest.raises(SkipSample, match="empty_caption"):
        ad(_sample(0, raw="  "))
    bad = _sample(0)
    bad["json"] = b"{not json"
    with pytest.raises(SkipSample, match="bad_json"):
        ad(bad)
