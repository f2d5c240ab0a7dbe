"""Exact accumulation for LLM2CLIP: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64 through the
trainer, for stage 2 (image-adapter InfoNCE) and stage 1's SimCSE and MNTP objectives; and, with dropout on,
the accumulated gradient of a SimCSE step equals the whole batch's when each chunk's dropout is replayed.

Dropout draws its masks per forward call, so a batch seen in 4 chunks has other masks than in one piece: the
trainer checks run with dropout off, and the replay is checked against a direct reference (each chunk's
forward with gradient in the same random sequence, one loss on the merged features, one backward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from vlp_llm2clip import LLM_METHOD, METHOD
from vlp_llm2clip.data import CaptionTripleAdapter
from vlp_llm2clip.presets import llm_smoke

from vlp_core.data.tokenizer import Tokenizer
from vlp_core.testing.accumulate import check_exact_accumulation, train_params, worst_errors
from vlp_core.train import accumulate
from vlp_core.train.accumulate import accumulate_exact, merge_features, split_batch
from vlp_core.train.loop import TrainStep

# check_exact_accumulation trains the "smoke" preset: stage 1's is llm_smoke.
STAGE1 = dataclasses.replace(LLM_METHOD, presets={"smoke": llm_smoke})


def test_stage2_accumulated_step_equals_the_whole_batch(tiny_world, tiny_bert, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    check_exact_accumulation(METHOD, tiny_world, tmp_path, f"loss.text_model={tiny_bert}",
                             f"model.text.tokenizer={tiny_bert}", "data.workers=0")


def _stage1(world: Path, folder: Path, *extra: str) -> dict[str, float]:
    """Stage 1 at accum 4 against accum 1 (``check_exact_accumulation`` wants a learnable temperature; SimCSE's
    scale is fixed): every parameter within 1e-5; the errors of the loss cut per chunk."""
    whole = train_params(STAGE1, world, folder / "whole", 1, *extra)
    errors = worst_errors(train_params(STAGE1, world, folder / "exact", 4, *extra), whole)
    assert errors and max(errors.values()) < 1e-5, {k: v for k, v in errors.items() if v >= 1e-5}
    naive = dataclasses.replace(STAGE1, exact_accumulation=False)
    return worst_errors(train_params(naive, world, folder / "naive", 4, *extra), whole)


@pytest.mark.parametrize("objective", ["simcse", "mntp"])
def test_stage1_accumulated_step_equals_the_whole_batch(tiny_world, tiny_llama, tmp_path, objective) -> None:
    """SimCSE: negatives over the whole batch; MNTP: normalised over the whole step's selected tokens."""
    cut = _stage1(tiny_world, tmp_path, f"loss.text_model={tiny_llama}", f"model.text.tokenizer={tiny_llama}",
                  "loss.lora_dropout=0.0", f"loss.objective={objective}", "data.workers=0")
    assert max(cut.values()) > 1e-3, "cutting the loss per chunk agreed with the whole batch"


def _batch(tok: Tokenizer, adapter: CaptionTripleAdapter, n: int) -> dict:
    shapes, colors = ["circle", "square", "star", "triangle"], ["red", "blue", "green", "yellow"]
    samples = []
    for s in range(n):
        obj = {"shape": shapes[s % 4], "color": colors[(s // 4) % 4], "size": "large", "row": "top", "col": "left"}
        short = f"a {obj['color']} {obj['shape']}."
        long = f"There is one object. A large {obj['color']} {obj['shape']} is at the top left." + " Yes." * (s % 3)
        samples.append(adapter({"__seed__": s, "jpg": b"x",
                                "json": json.dumps({"clean": short, "long": long, "objects": [obj]})}))
    return adapter.collate(samples)


def _grads(step: TrainStep) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in step.named_parameters() if p.grad is not None}
    step.zero_grad(set_to_none=True)
    return out


def _max_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    assert got.keys() == ref.keys() and ref
    return max(float((got[k] - r).abs().max() / (r.abs().max() or 1.0)) for k, r in ref.items())


def test_simcse_dropout_is_replayed_per_chunk(tiny_bert, monkeypatch) -> None:
    """BERT's hidden/attention dropout (0.1) and LoRA dropout (0.1) on: the exact step's gradient equals the
    gradient of one loss over the merged features of the chunks' forwards drawn in the same random order; with
    the RNG restore disabled it does not (so dropout really acts and the replay is what makes it exact)."""
    cfg = llm_smoke()
    cfg.loss.text_model = cfg.model.text.tokenizer = str(tiny_bert)
    cfg.loss.lora_dropout = 0.1
    tok = Tokenizer.from_pretrained(str(tiny_bert), context_length=32)
    torch.manual_seed(0)
    step = TrainStep(LLM_METHOD.build_model(cfg, tok), LLM_METHOD.build_loss(cfg)).train()
    for name, p in step.named_parameters():  # LoRA B starts at zero: make every LoRA weight matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch(tok, CaptionTripleAdapter(cfg.loss, tok), 8)
    chunks = split_batch(batch, 4)

    def exact(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        accumulate_exact(step, step, chunks, batch, backward=lambda loss: loss.backward(),
                         sync=lambda last: contextlib.nullcontext(),
                         autocast=torch.autocast("cpu", enabled=False), device=torch.device("cpu"))
        return _grads(step)

    def reference(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        features = merge_features([step.model(c) for c in chunks])
        step.loss(features, batch).loss.backward()
        return _grads(step)

    ref = reference(1)
    assert _max_error(exact(1), ref) < 1e-5
    assert _max_error(reference(2), ref) > 1e-3  # dropout is on: another seed, other masks
    monkeypatch.setattr(accumulate, "set_rng_state", lambda state: None)
    assert _max_error(exact(1), ref) > 1e-3  # without the replay the recompute draws other masks

