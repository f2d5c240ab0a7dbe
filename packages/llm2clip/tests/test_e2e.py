"""Both stages through their CLIs on the tiny world with tiny local text models."""

from __future__ import annotations

import json

import torch
from vlp_llm2clip.cli import eval_main, finetune_main, train_main


def test_finetune_llm_then_train_and_eval(tiny_world, tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    run1 = tmp_path / "stage1"
    rc = finetune_main(["--preset", "llm_smoke", "--set", f"loss.text_model={tiny_llama}",
                        "--set", f"model.text.tokenizer={tiny_llama}", "--set", f"data.world_dir={tiny_world}",
                        "--set", "train.progress=false", "--output-dir", str(run1)])
    assert rc == 0
    text_model = run1 / "text_model"
    assert (text_model / "llm2clip.json").is_file() and (text_model / "tokenizer.json").is_file()
    metrics = [json.loads(x) for x in (run1 / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in m and m["train/loss"] > 0 for m in metrics)

    # The merged export embeds exactly like the trained LoRA model of the last checkpoint.
    from vlp_llm2clip import LLM_METHOD
    from vlp_llm2clip.caption_model import CaptionEmbedder
    from vlp_llm2clip.encoder import load_encoder

    from vlp_core.data.tokenizer import Tokenizer
    from vlp_core.train.checkpoint import CheckpointManager

    cfg = LLM_METHOD.preset("llm_smoke")
    cfg.loss.text_model = str(tiny_llama)
    lora = CaptionEmbedder(cfg.loss)
    saved = CheckpointManager.load(CheckpointManager(run1 / "checkpoints").latest())
    lora.load_state_dict({k.removeprefix("model."): v for k, v in saved["model"].items() if k.startswith("model.")})
    merged = load_encoder(text_model).eval()
    lora.eval()
    tok = Tokenizer.from_pretrained(str(text_model), context_length=32)
    rows = tok(["a large red circle at the top left.", "a small star."])
    with torch.no_grad():
        torch.testing.assert_close(merged.forward_tokens(rows, tok), lora.encoder.forward_tokens(rows, tok),
                                   atol=1e-5, rtol=1e-4)
    lora_b = [v for k, v in saved["model"].items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # LoRA really trained

    run2 = tmp_path / "stage2"
    rc = train_main(["--preset", "smoke", "--set", f"loss.text_model={text_model}",
                     "--set", f"model.text.tokenizer={text_model}", "--set", f"data.world_dir={tiny_world}",
                     "--set", "train.progress=false", "--output-dir", str(run2)])
    assert rc == 0
    results = json.loads(capsys.readouterr().out.split("text model saved to")[-1].split("\n", 1)[1])
    assert "retrieval_long/i2t_R@1" in results and "zeroshot_shape/top1" in results
    assert eval_main([str(run2), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["retrieval_long/t2i_R@1"] == results["retrieval_long/t2i_R@1"]


def test_clear_error_for_wrong_tokenizer(tiny_world, tiny_bert, tiny_llama, llama3_like, tmp_path, capsys,
                                        monkeypatch):
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    common = ["--preset", "smoke", "--set", f"loss.text_model={tiny_bert}", "--set", f"data.world_dir={tiny_world}",
              "--set", "train.steps=1", "--set", "eval.at_end=false", "--set", "train.progress=false"]
    rc = train_main([*common, "--set", f"model.text.tokenizer={llama3_like}", "--output-dir", str(tmp_path / "r")])
    assert rc == 2 and "own tokenizer" in capsys.readouterr().err
    # Another folder with the same tokenizer (same ids) is accepted: a preset may name the hub tokenizer.
    rc = train_main([*common, "--set", f"model.text.tokenizer={tiny_llama}", "--output-dir", str(tmp_path / "r2")])
    assert rc == 0, capsys.readouterr().err
