"""Stage-1 triples from image-text samples (direction coin flip, swapped-colour hard negative) and text pairs."""

from __future__ import annotations

import json

import pytest
import torch
from vlp_llm2clip import LLM_METHOD
from vlp_llm2clip.data import CaptionTripleAdapter, swap_negative

from vlp_core.data.tokenizer import Tokenizer
from vlp_core.method import SkipSample

OBJECTS = [{"shape": "circle", "color": "red", "size": "large", "row": "top", "col": "left"},
           {"shape": "star", "color": "blue", "size": "small", "row": "middle", "col": "center"}]


def _image_sample(seed: int) -> dict:
    from vlp_core.data.synthetic import clean_caption, long_caption

    meta = {"clean": clean_caption(OBJECTS), "long": long_caption(OBJECTS), "objects": OBJECTS}
    return {"__seed__": seed, "jpg": b"x", "json": json.dumps(meta)}


def test_image_sample_triples_both_directions_and_swap_negative(tiny_llama):
    cfg = LLM_METHOD.preset("llm_smoke").loss
    adapter = CaptionTripleAdapter(cfg, Tokenizer.from_pretrained(str(tiny_llama), context_length=64))
    seen = set()
    for seed in range(16):
        out = adapter(_image_sample(seed))
        meta = json.loads(_image_sample(seed)["json"])
        if out["instruction"] == cfg.short_to_long_instruction:
            assert (out["q"], out["p"]) == (meta["clean"], meta["long"])
            assert "blue circle" in out["n"].lower() and "red star" in out["n"].lower()
        else:
            assert (out["q"], out["p"]) == (meta["long"], meta["clean"])
            assert out["n"] == swap_negative(_image_sample(seed), "short")
        seen.add(out["instruction"])
    assert len(seen) == 2
    batch = adapter.collate([adapter(_image_sample(s)) for s in range(3)])
    assert {"q_tokens", "q_pool", "p_tokens", "n_tokens"} <= set(batch)
    assert (batch["q_pool"].sum(1) < batch["q_attention"].sum(1)).all()  # instruction attended, not pooled


def test_single_object_negative_changes_the_colour():
    one = {"__seed__": 0, "jpg": b"x", "json": json.dumps({"objects": OBJECTS[:1]})}
    assert "green circle" in swap_negative(one, "short")
    with pytest.raises(SkipSample):
        swap_negative({"json": "{}"}, "short")


def test_text_only_pairs(tiny_llama):
    cfg = LLM_METHOD.preset("llm_smoke").loss
    adapter = CaptionTripleAdapter(cfg, Tokenizer.from_pretrained(str(tiny_llama), context_length=64))
    sample = {"__seed__": 3, "json": json.dumps({"query": "red star", "positive": "a small red star.",
                                                 "negative": "a small blue star.", "instruction": "Retrieve;"})}
    out = adapter(sample)
    assert out == {"q": "red star", "p": "a small red star.", "n": "a small blue star.", "instruction": "Retrieve;"}
    batch = adapter.collate([out, out])
    assert torch.equal(batch["p_tokens"][0], batch["p_tokens"][1])
