"""llm2clip-embed: idempotent, resumable, keyed; the stage-2 adapter reads what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from vlp_llm2clip.cli import embed_main
from vlp_llm2clip.embed import EmbeddingIndex, embed_shards

from vlp_core.data.tario import iter_samples


def _pattern(world: Path) -> str:
    shards = sorted((world / "train").glob("*.tar"))
    return f"{world}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


def test_embed_twice_is_identical_and_does_not_grow(tiny_world, tiny_bert, tmp_path, capsys):
    out = tmp_path / "emb"
    args = [_pattern(tiny_world), "--text-model", str(tiny_bert), "--out", str(out), "--context-length", "48",
            "--batch-size", "16"]
    assert embed_main(args) == 0
    first = _snapshot(out)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_done"] == 3
    assert embed_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_skipped"] == 3
    assert _snapshot(out) == first
    # Resumable: a shard whose completion record is gone is redone, bit-identically.
    victim = next(p for p in out.glob("*.json") if p.name != "manifest.json")
    victim.unlink()
    (out / victim.name.replace(".json", ".json_long.npy")).unlink()
    assert embed_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_done"] == 1
    assert _snapshot(out) == first


def test_index_matches_direct_encoding(tiny_world, tiny_bert, tmp_path):
    from vlp_llm2clip.encoder import load_encoder

    from vlp_core.data.tokenizer import Tokenizer

    out = tmp_path / "emb"
    embed_shards(_pattern(tiny_world), out, text_model=str(tiny_bert), caption_keys=["json.long"],
                 context_length=48, batch_size=5)
    index = EmbeddingIndex(out)
    url = str(sorted((tiny_world / "train").glob("*.tar"))[1])
    samples = list(iter_samples(url))[:4]
    tok = Tokenizer.from_pretrained(str(tiny_bert), context_length=48)
    enc = load_encoder(tiny_bert).eval()
    with torch.no_grad():
        ref = enc.forward_tokens(tok([json.loads(s["json"])["long"] for s in samples]), tok)
    for s, r in zip(samples, ref):
        torch.testing.assert_close(index.lookup(url, s["__key__"], "json.long"), r, atol=1e-5, rtol=1e-4)


def test_output_inside_inputs_and_changed_settings_are_refused(tiny_world, tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="inside the output folder"):
        embed_shards(_pattern(tiny_world), tiny_world, text_model=str(tiny_bert), caption_keys=["json.long"])
    out = tmp_path / "emb"
    embed_shards(_pattern(tiny_world), out, text_model=str(tiny_bert), caption_keys=["json.long"],
                 context_length=48)
    with pytest.raises(ValueError, match="other settings"):
        embed_shards(_pattern(tiny_world), out, text_model=str(tiny_bert), caption_keys=["json.long"],
                     context_length=32)
    assert not list(out.glob("*.tar"))
    assert all(np.load(p).shape[1] == 32 for p in out.glob("*.npy"))
