"""``llm2clip-train --init-from`` a converted OpenCLIP checkpoint: LLM2CLIP's vision tower starts from it (its
text side is precomputed caption embeddings of a frozen language model), trains 2 steps and evaluates."""

import pytest
from vlp_llm2clip.cli import train_main

from vlp_core.testing.pretrained import openclip_checkpoint, train_from_checkpoint

pytest.importorskip("open_clip")


def test_init_from_openclip_then_train_and_evaluate(tiny_world, tiny_bert, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    converted = openclip_checkpoint(tmp_path / "openclip")
    assert train_from_checkpoint(train_main, converted, tiny_world, tmp_path / "run", f"loss.text_model={tiny_bert}",
                                 f"model.text.tokenizer={tiny_bert}", towers="visual") == 0
    out = capsys.readouterr()
    assert "zeroshot_color/top1" in out.out
    assert "loaded model.visual" in out.err
