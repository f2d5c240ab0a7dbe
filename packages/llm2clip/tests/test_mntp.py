"""MNTP: selection rules, the shifted masked loss against a plain reference, and the stage-1a -> 1b chain."""

from __future__ import annotations

import math

import torch
from vlp_llm2clip import LLM_METHOD
from vlp_llm2clip.cli import finetune_main
from vlp_llm2clip.mntp import IGNORE, MntpAdapter, MntpLoss, MntpModel

from vlp_core.data.tokenizer import Tokenizer


def _cfg(text_model):
    cfg = LLM_METHOD.preset("llm_smoke")
    cfg.loss.text_model = cfg.model.text.tokenizer = str(text_model)
    cfg.loss.objective, cfg.loss.mntp_probability, cfg.loss.lora_dropout = "mntp", 0.5, 0.0
    return cfg


def test_selection_touches_content_tokens_only(tiny_llama):
    cfg = _cfg(tiny_llama)
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=32)
    adapter = MntpAdapter(cfg.loss, tok)
    import json

    sample = {"jpg": b"", "json": json.dumps({"clean": "a large red circle at the top left.",
                                              "long": "There is one object. A large red circle is at the top left."})}
    selected = 0
    for seed in range(20):
        out = adapter({**sample, "__seed__": seed})
        lab = out["labels"]
        chosen = lab != IGNORE
        selected += int(chosen.sum())
        assert not chosen[0] and not chosen[~out["attention"]].any()  # never BOS or padding
        assert (lab[chosen] != tok.eot_id).all()
    assert selected > 0


def test_mntp_loss_equals_plain_shifted_reference(tiny_llama):
    cfg = _cfg(tiny_llama)
    cfg.loss.lora = False
    torch.manual_seed(0)
    model = MntpModel(cfg.loss).eval()
    tokens = torch.randint(4, 30, (2, 6))
    attention = torch.ones(2, 6, dtype=torch.bool)
    attention[1, 4:] = False
    labels = torch.full((2, 6), IGNORE)
    labels[0, 2], labels[0, 5], labels[1, 3] = 7, 9, 11
    batch = {"tokens": tokens, "attention": attention, "labels": labels}
    loss = MntpLoss()(model(batch), batch).loss
    # Reference: full logits from the bidirectional inner model, position t-1 predicts label t.
    from vlp_llm2clip.encoder import padding_only_mask

    with torch.no_grad():
        pos = (attention.long().cumsum(1) - 1).clamp(min=0)
        h = model.lm.model(input_ids=tokens, attention_mask=padding_only_mask(attention, torch.float32),
                           position_ids=pos).last_hidden_state
        logp = torch.log_softmax(model.lm.lm_head(h).double(), dim=-1)
    ref = -(logp[0, 1, 7] + logp[0, 4, 9] + logp[1, 2, 11]) / 3
    assert math.isclose(float(loss.detach()), float(ref), rel_tol=1e-5)


def test_mntp_then_simcse_chain(tiny_world, tiny_llama, tmp_path):
    common = ["--set", f"data.world_dir={tiny_world}", "--set", "train.progress=false",
              "--set", f"model.text.tokenizer={tiny_llama}"]
    assert finetune_main(["--preset", "llm_smoke", "--set", f"loss.text_model={tiny_llama}",
                          "--set", "loss.objective=mntp", *common, "--output-dir", str(tmp_path / "a")]) == 0
    first = tmp_path / "a" / "text_model"
    assert (first / "config.json").is_file()
    common[-1] = f"model.text.tokenizer={first}"
    assert finetune_main(["--preset", "llm_smoke", "--set", f"loss.text_model={first}", *common,
                          "--output-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "text_model" / "llm2clip.json").is_file()
