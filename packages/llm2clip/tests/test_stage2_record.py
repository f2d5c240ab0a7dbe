"""Stage 2 refuses precomputed embeddings that do not match the run (text model, its content and pooling, context
length, caption instruction) with a one-line error; llm2clip-embed records these facts and takes the preset's
context length; an instruction is applied identically by the extraction and the evaluation path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from vlp_llm2clip import METHOD, ensure_embeddings
from vlp_llm2clip.cli import embed_main, train_main
from vlp_llm2clip.embed import MANIFEST, EmbeddingIndex, embed_shards

from vlp_core.data.tario import iter_samples


def _pattern(world: Path) -> str:
    shards = sorted((world / "train").glob("*.tar"))
    return f"{world}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


def _cfg(text_model: Path, embeddings: Path, context_length: int = 32):
    cfg = METHOD.preset("smoke")
    cfg.loss.text_model = cfg.model.text.tokenizer = str(text_model)
    cfg.loss.embeddings = str(embeddings)
    cfg.model.text.context_length = context_length
    return cfg


@pytest.fixture(scope="module")
def bert_copy(tiny_bert, tmp_path_factory) -> Path:
    """A private copy of the tiny text model (one test re-exports it)."""
    return Path(shutil.copytree(tiny_bert, tmp_path_factory.mktemp("m") / "bert"))


@pytest.fixture(scope="module")
def embedded(tiny_world, bert_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("emb") / "e"
    shard = str(sorted((tiny_world / "train").glob("*.tar"))[0])
    embed_shards(shard, out, text_model=str(bert_copy), caption_keys=["json.clean", "json.long"], context_length=32)
    return out


def _error(cfg) -> str:
    with pytest.raises(ValueError) as e:
        ensure_embeddings(cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_matching_record_is_accepted(embedded, bert_copy):
    manifest = json.loads((embedded / MANIFEST).read_text())
    assert manifest["instruction"] == "" and manifest["context_length"] == 32 and manifest["text_model_fingerprint"]
    assert ensure_embeddings(_cfg(bert_copy, embedded)) == embedded


def test_context_length_instruction_and_text_model_mismatches(embedded, bert_copy, tiny_llama):
    assert "context length (model.text.context_length): embeddings 32, run 48" in _error(
        _cfg(bert_copy, embedded, context_length=48))
    cfg = _cfg(bert_copy, embedded)
    cfg.loss.caption_instruction = "Given a caption, retrieve a similar relevant caption;"
    assert "caption instruction (loss.caption_instruction)" in _error(cfg)
    assert "text model (loss.text_model)" in _error(_cfg(tiny_llama, embedded))


def test_old_manifest_without_record_is_refused(embedded, bert_copy, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(embedded, old)
    manifest = json.loads((old / MANIFEST).read_text())
    for k in ("instruction", "text_model_fingerprint"):
        manifest.pop(k)
    manifest["format"] = 1
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert "older llm2clip-embed" in _error(_cfg(bert_copy, old)) and "re-run llm2clip-embed" in _error(
        _cfg(bert_copy, old))


def test_reexported_text_model_is_refused_at_the_cli(embedded, bert_copy, tiny_world, tmp_path, capsys):
    settings = bert_copy / "llm2clip.json"
    settings.write_text(json.dumps({"version": 1, "pooling": "mean", "pool_bos": True, "bidirectional": True}))
    try:
        rc = train_main(["--preset", "smoke", "--set", f"loss.text_model={bert_copy}",
                         "--set", f"model.text.tokenizer={bert_copy}", "--set", f"loss.embeddings={embedded}",
                         "--set", f"data.world_dir={tiny_world}", "--output-dir", str(tmp_path / "run")])
    finally:
        settings.unlink()
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("llm2clip-train: error:")]
    assert rc == 2 and len(errors) == 1  # one line, no traceback (log lines aside)
    assert "text model content" in errors[0] and "pooling settings" in errors[0]


def test_embed_defaults_to_the_presets_context_length(tiny_world, tiny_bert, tmp_path):
    shard = str(sorted((tiny_world / "train").glob("*.tar"))[0])
    assert embed_main([shard, "--text-model", str(tiny_bert), "--out", str(tmp_path / "e"), "--preset", "smoke",
                       "--caption-keys", "json.long"]) == 0
    manifest = json.loads((tmp_path / "e" / MANIFEST).read_text())
    assert manifest["context_length"] == METHOD.preset("smoke").model.text.context_length == 32


def test_instruction_extraction_equals_evaluation_path(tiny_world, tiny_llama, tmp_path):
    from vlp_llm2clip.encoder import load_encoder, tokenize

    from vlp_core.data.tokenizer import Tokenizer

    instruction = "Given a sentence, retrieve a detailed relevant sentence;"
    shard = str(sorted((tiny_world / "train").glob("*.tar"))[0])
    out = tmp_path / "e"
    embed_shards(shard, out, text_model=str(tiny_llama), caption_keys=["json.long"], context_length=24,
                 instruction=instruction)
    samples = list(iter_samples(shard))[:3]
    captions = [json.loads(s["json"])["long"] for s in samples]
    cfg = _cfg(tiny_llama, out, context_length=24)
    cfg.loss.caption_instruction = instruction
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=24)
    model = METHOD.build_model(cfg, tok)
    encoder = load_encoder(tiny_llama).eval()
    rows = tokenize(tok, captions, [instruction] * len(captions))
    with torch.no_grad():
        direct = encoder(rows["tokens"], rows["attention"], rows["pool"])
        evaluated = model.embed_tokens(tok(captions))
        plain = encoder.forward_tokens(tok(captions), tok)
    index = EmbeddingIndex(out)
    stored = torch.stack([index.lookup(shard, s["__key__"], "json.long") for s in samples])
    torch.testing.assert_close(stored, direct, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(evaluated, direct, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, direct, atol=1e-3)  # the instruction is attended to
