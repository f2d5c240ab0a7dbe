"""Exact accumulation for LCL: row slices of a batch merge into the whole batch, and through the trainer
``accum_steps=4`` == ``accum_steps=1`` at global batch 64 (pairs and interleaved documents mixed).

The batch is row-major (``vlp_lcl.data``), so the core's row split makes chunks that are batches; the model's
per-image features concatenate and its generation sum and token count are 0-dim sums, so the loss run on the
merged features normalises the generation part by the whole step's tokens and the contrastive part by the
whole step's pairs (with the capacity of the whole step).
"""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import SENTENCES, document, pair, tiny_cfg
from vlp_lcl import METHOD

from vlp_core.data.transforms import prepare_images
from vlp_core.testing.accumulate import check_exact_accumulation
from vlp_core.train.accumulate import merge_features, split_batch
from vlp_core.train.loop import TrainStep

F64 = torch.float64


def test_row_slices_merge_into_the_whole_batch(tokenizer) -> None:
    """Chunks of 1-image pairs and 2-3-image documents: merged features, sums and loss == the whole batch's."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    step = TrainStep(METHOD.build_model(cfg, tokenizer), METHOD.build_loss(cfg)).to(F64)
    adapter = METHOD.build_adapter(cfg, tokenizer)
    rows = [pair(0), document(1, SENTENCES[:4], [(0, 1.0), (2, 1.0)]), pair(2), pair(3),
            document(4, SENTENCES[:5], [(0, 1.0), (1, 1.0), (3, 1.0)]), pair(5)]
    batch = adapter.collate([adapter(s) for s in rows])
    batch["images"] = prepare_images(batch["images"], torch.device("cpu")).to(F64)
    with torch.no_grad():
        whole = step.model(batch)
        chunks = split_batch(batch, 3)
        assert [c["images"].shape[1] for c in chunks] == [3, 3, 3]  # the batch's padding is kept: still a batch
        merged = merge_features([step.model(c) for c in chunks])
        for key, value in whole.items():
            torch.testing.assert_close(merged[key], value, rtol=1e-12, atol=1e-12, msg=key)
        assert whole["gen_tokens"].ndim == 0 and whole["gen_nll_sum"].ndim == 0
        assert int(whole["gen_tokens"]) == sum(len(r) for r in batch["gen_pos"])
        assert whole["image_latent"].shape[0] == 1 + 2 + 1 + 1 + 3 + 1
        torch.testing.assert_close(step.loss(merged, batch).loss, step.loss(whole, batch).loss)


def test_accumulated_step_equals_the_whole_batch(tiny_world: Path, tmp_path: Path) -> None:
    """:func:`vlp_core.testing.accumulate.check_exact_accumulation` on pairs and documents mixed 1:1. The two
    pooling biases ``model.pool.k_bias`` / ``norm_k.bias`` have an exact gradient of zero (one pooling query:
    adding a constant to every key's score leaves the softmax unchanged) and are held at noise level."""
    data = f"{tiny_world}/train/{{00000..00001}}.tar::{tiny_world}/docs/00000.tar"
    errors = check_exact_accumulation(METHOD, tiny_world, tmp_path, f"data.train_data={data}",
                                      "data.train_weights=1::1")
    assert "model.pool.k_bias" not in errors and "loss.logit_scale" in errors
