"""LLM2CLIP at 8B on a tiny Llama: the configured weight dtype, rows cut to the batch's longest, MNTP logits at
the selected positions only, gradient checkpointing (same gradients, layers really re-run), and stage 2's
evaluation dropping the text model when training resumes."""

from __future__ import annotations

import json

import pytest
import torch
from vlp_llm2clip import LLM_METHOD, METHOD
from vlp_llm2clip.caption_model import CaptionEmbedder
from vlp_llm2clip.data import CaptionTripleAdapter
from vlp_llm2clip.encoder import resolve_llm_dtype, tokenize
from vlp_llm2clip.loss import SimCseLoss
from vlp_llm2clip.mntp import IGNORE, MntpAdapter, MntpLoss, MntpModel

from vlp_core.data.tokenizer import Tokenizer

SHORT = "a red circle."
LONG = "There are two objects. A large red circle is at the top left. A small blue star is in the middle."


def _cfg(text_model, objective="simcse"):
    cfg = LLM_METHOD.preset("llm_smoke")
    cfg.loss.text_model = cfg.model.text.tokenizer = str(text_model)
    cfg.loss.objective, cfg.loss.mntp_probability, cfg.loss.lora_dropout = objective, 0.5, 0.0
    return cfg


@pytest.fixture(scope="module")
def bf16_llama(tiny_llama, tmp_path_factory):
    """The tiny Llama saved in bfloat16 (as Llama-3-8B is): transformers 5 would load it in bf16 by default."""
    from transformers import LlamaModel

    folder = tmp_path_factory.mktemp("models") / "llama_bf16"
    LlamaModel.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes((tiny_llama / "tokenizer.json").read_bytes())
    return folder


def _dtypes(model: torch.nn.Module) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """(dtypes of the frozen base weights, dtypes of the trainable ones)."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    return frozen, trained


def test_llm_dtype_auto_resolves_by_device_and_precision():
    assert resolve_llm_dtype("auto", cuda=False) == torch.float32
    assert resolve_llm_dtype("auto", cuda=True) == torch.bfloat16
    assert resolve_llm_dtype("auto", "fp32", cuda=True) == torch.float32
    assert resolve_llm_dtype("bf16", cuda=False) == torch.bfloat16
    assert resolve_llm_dtype("fp32", cuda=True) == torch.float32
    with pytest.raises(ValueError, match="loss.llm_dtype"):
        resolve_llm_dtype("fp16")


@pytest.mark.parametrize("objective", ["simcse", "mntp"])
def test_llm_dtype_is_honoured_not_the_checkpoints(bf16_llama, objective, monkeypatch):
    cfg = _cfg(bf16_llama, objective)
    tok = Tokenizer.from_pretrained(str(bf16_llama), context_length=32)
    cfg.loss.llm_dtype = "fp32"  # a bf16 checkpoint, loaded in fp32 as configured
    assert _dtypes(LLM_METHOD.build_model(cfg, tok)) == ({torch.float32}, {torch.float32})
    cfg.loss.llm_dtype = "bf16"  # the base in bf16, LoRA kept in fp32 (peft)
    assert _dtypes(LLM_METHOD.build_model(cfg, tok)) == ({torch.bfloat16}, {torch.float32})
    cfg.loss.llm_dtype = "auto"
    assert _dtypes(LLM_METHOD.build_model(cfg, tok))[0] == {torch.float32}  # this machine's CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA run: bf16
    assert _dtypes(LLM_METHOD.build_model(cfg, tok))[0] == {torch.bfloat16}


def _image_sample(seed: int, short: str, long: str) -> dict:
    objects = [{"shape": "circle", "color": "red", "size": "large", "row": "top", "col": "left"},
               {"shape": "star", "color": "blue", "size": "small", "row": "middle", "col": "center"}]
    return {"__seed__": seed, "jpg": b"x", "json": json.dumps({"clean": short, "long": long, "objects": objects})}


def test_triples_are_cut_to_the_batchs_longest_row_same_embeddings(tiny_llama):
    cfg = _cfg(tiny_llama)
    cfg.loss.hard_negative, cfg.loss.lora = "none", False
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=64)
    adapter = CaptionTripleAdapter(cfg.loss, tok)
    samples = [adapter(_image_sample(s, SHORT, text)) for s, text in enumerate([LONG, "a blue star."])]
    batch = adapter.collate(samples)
    longest = max(int(batch[f"{n}_attention"].sum(dim=1).max()) for n in ("q", "p"))
    for n in ("q", "p"):
        assert batch[f"{n}_tokens"].shape[1] == batch[f"{n}_pool"].shape[1] == longest < 64
    # The same rows padded to the context length embed identically.
    full = {}
    for n, key in (("q", "q"), ("p", "p")):
        rows = tokenize(tok, [s[key] for s in samples], [s["instruction"] for s in samples] if n == "q" else None)
        full.update({f"{n}_{k}": v for k, v in rows.items()})
    model = CaptionEmbedder(cfg.loss).eval()
    with torch.no_grad():
        got, ref = model(batch), model(full)
    for n in ("q", "p"):
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-5)


def test_mntp_rows_are_cut_to_the_batchs_longest(tiny_llama):
    cfg = _cfg(tiny_llama, "mntp")
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=64)
    adapter = MntpAdapter(cfg.loss, tok)
    batch = adapter.collate([adapter(_image_sample(s, SHORT, SHORT)) for s in range(3)])
    assert batch["tokens"].shape[1] == int(batch["attention"].sum(dim=1).max()) == len(tok.encode(SHORT)) + 2
    assert batch["labels"].shape == batch["tokens"].shape


def _mntp_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab, (3, 9), generator=g)
    attention = torch.ones(3, 9, dtype=torch.bool)
    attention[1, 6:] = False
    attention[2, 4:] = False
    labels = torch.full((3, 9), IGNORE)
    for b, t in [(0, 2), (0, 5), (0, 8), (1, 1), (1, 4), (2, 3)]:
        labels[b, t] = int(torch.randint(4, vocab, (1,), generator=g))
    return {"tokens": tokens, "attention": attention, "labels": labels}


def test_mntp_selected_logits_give_the_full_logits_loss_and_gradients(tiny_llama):
    cfg = _cfg(tiny_llama, "mntp")
    model = MntpModel(cfg.loss)
    batch = _mntp_batch(model.causal_lm().config.vocab_size)
    out = model.selected_logits(batch)
    assert out["logits"].shape == (6, model.causal_lm().config.vocab_size)  # M x V, not B x L x V
    loss = MntpLoss()(model(batch), batch).loss  # the model's 0-dim sums
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    # Reference: every position through the LM head (B x (L-1) x V), ignored labels masked in the loss.
    from vlp_llm2clip.encoder import hidden_states

    lm = model.causal_lm()
    hidden = hidden_states(lm.model, batch["tokens"], batch["attention"], bidirectional=True)
    full = {"logits": lm.lm_head(hidden[:, :-1]).float(), "labels": batch["labels"][:, 1:]}
    ref = MntpLoss()(full, batch).loss
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5)


def _layer_calls(model: torch.nn.Module) -> list[int]:
    """Calls of the decoder layers' MLPs (transformers checkpoints a layer's ``forward``, inside its hooks)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = [0]
    for m in model.modules():
        if isinstance(m, LlamaMLP):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _step_grads(model, loss_fn, batch, checkpointing: bool) -> tuple[dict[str, torch.Tensor], int]:
    model.train()
    model.set_grad_checkpointing(checkpointing)
    calls = _layer_calls(model)
    model.zero_grad(set_to_none=True)
    loss_fn(model(batch), batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, calls[0]


@pytest.mark.parametrize("objective", ["simcse", "mntp"])
def test_grad_checkpointing_reruns_layers_same_gradients(tiny_llama, objective):
    cfg = _cfg(tiny_llama, objective)
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=32)
    torch.manual_seed(0)
    model = LLM_METHOD.build_model(cfg, tok)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make every LoRA weight matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    if objective == "mntp":
        batch, loss_fn = _mntp_batch(tok.vocab_size), MntpLoss()
    else:
        adapter = CaptionTripleAdapter(cfg.loss, tok)
        batch = adapter.collate([adapter(_image_sample(s, SHORT, LONG)) for s in range(3)])
        loss_fn = SimCseLoss(cfg.loss.scale)
    plain, n_plain = _step_grads(model, loss_fn, batch, False)
    ckpt, n_ckpt = _step_grads(model, loss_fn, batch, True)
    assert n_plain == 2 and n_ckpt == 4  # 2 layers: forward once, then again during backward
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-7, rtol=1e-6)


def test_stage2_eval_text_model_is_float32_and_dropped_for_training(tiny_llama):
    cfg = METHOD.preset("smoke")
    cfg.loss.text_model = cfg.model.text.tokenizer = str(tiny_llama)
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=cfg.model.text.context_length)
    model = METHOD.build_model(cfg, tok).eval()
    rows = tok([SHORT, LONG])
    ref = model.embed_tokens(rows)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the evaluation's autocast does not reach the LLM
        got = model.embed_tokens(rows)
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert len(model._encoder) == 1 and {p.dtype for p in model._encoder[0].parameters()} == {torch.float32}
    model.train()  # the trainer's evaluation hands the model back to training
    assert model._encoder == []
    torch.testing.assert_close(model.eval().embed_tokens(rows), ref)  # reloaded on the next evaluation


@pytest.mark.parametrize("objective", ["simcse", "mntp"])
def test_blocks_are_the_decoder_layers_for_per_layer_sharding(tiny_llama, objective):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cfg = _cfg(tiny_llama, objective)
    model = LLM_METHOD.build_model(cfg, Tokenizer.from_pretrained(str(tiny_llama), context_length=32))
    holder = model.encoder if objective == "simcse" else model
    blocks = holder.blocks
    assert len(blocks) == 2 and all(isinstance(b, LlamaDecoderLayer) for b in blocks)
    assert any("lora_A" in n for n, _ in blocks[0].named_parameters())  # the LoRA weights live in the layers


def test_memory_tool_counts_the_model_it_builds(tiny_llama, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[3] / "tools" / "llm2clip_memory.py"
    if not path.is_file():
        pytest.skip("tools/ is not in this checkout")
    spec = importlib.util.spec_from_file_location("llm2clip_memory", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    model, _ = tool.build(str(tiny_llama))
    frozen = sum(p.numel() * 2 for p in model.parameters() if not p.requires_grad)  # bf16
    rows = dict((what, (sample, gpu)) for what, sample, gpu in
                tool.estimate(model, gpus=2, batch=8, context=16, rows_per_sample=3))
    assert rows["text-model weights, bf16, sharded"][1] == frozen / 2
    # 2 layers x 16 tokens x width 32 x bf16, 3 rows per sample, 4 samples per GPU
    assert rows["activations: checkpointed layer inputs"] == (3 * 2 * 16 * 32 * 2, 4 * 3 * 2 * 16 * 32 * 2)
    assert all(gpu > 0 for _, gpu in rows.values())
    assert tool.main(["--text-model", str(tiny_llama), "--gpus", "2", "--batch", "8", "--context", "16"]) == 0
    assert "total (peak, estimate)" in capsys.readouterr().out
