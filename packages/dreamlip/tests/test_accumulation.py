"""Exact accumulation for DreamLIP: its features and batch merge under the core's rules (batch-first tensors
concatenated, lists concatenated) into the whole batch's, so the multi-positive and sub-caption grouping losses
on the merged chunks equal the whole batch's; and through the trainer ``accum_steps=4`` == ``accum_steps=1``
at global batch 64.

Legend: B batch, T texts per image, L context length, N patches, D embedding dim.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vlp_dreamlip import METHOD, DreamLipLoss, DreamLipModel

from vlp_core.testing.accumulate import check_exact_accumulation
from vlp_core.train.accumulate import merge_batches, merge_features, split_batch


def _batch(b: int = 8, t: int = 3, length: int = 7) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens_BTL = torch.randint(3, 60, (b, t, length), generator=g)
    tokens_BTL[..., -2:] = 0  # right padding
    tokens_BTL[..., -3] = 2  # EOT before it
    ids_BT = torch.arange(t).repeat(b, 1)
    ids_BT[1, 2] = 1  # a duplicate sub-caption (a pool smaller than K)
    return {"images": torch.randn(b, 3, 32, 32, generator=g), "tokens": tokens_BTL, "caption_ids": ids_BT,
            "texts": [f"raw {i}" for i in range(b)], "subcaptions": [[f"s{i}{j}" for j in range(t)] for i in range(b)]}


@pytest.mark.parametrize("negatives", ["image", "global"])
def test_merged_chunks_give_the_whole_batch_loss(negatives: str) -> None:
    cfg = METHOD.preset("smoke")
    cfg.model.vision.image_size = 32
    cfg.loss.sgl_negatives = negatives
    torch.manual_seed(0)
    model = DreamLipModel(cfg.model, vocab_size=64, pad_id=0, eot_id=2, bos_id=1).eval()
    loss = DreamLipLoss(cfg.loss)
    batch = _batch()
    chunks = split_batch(batch, 4)
    merged_batch = merge_batches(chunks)
    assert merged_batch.keys() == batch.keys()
    for key, value in batch.items():
        assert torch.equal(merged_batch[key], value) if isinstance(value, torch.Tensor) else \
            merged_batch[key] == value, key
    with torch.no_grad():
        whole = model(batch)
        merged = merge_features([model(c) for c in chunks])
    assert {k: tuple(v.shape) for k, v in merged.items()} == {k: tuple(v.shape) for k, v in whole.items()}
    assert set(whole) == {"image_features", "text_features", "patch_features"}
    for key in whole:  # rows are independent: the chunks' features are the whole batch's
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-5, atol=1e-6)
    got, want = loss(merged, merged_batch), loss(whole, batch)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    assert float(want.parts["loss_sgl"]) > 0 and float(want.parts["loss_mpcl"]) > 0
    # and not the mean of per-chunk losses (the loss couples the samples: fewer negatives per chunk)
    with torch.no_grad():
        per_chunk = torch.stack([loss(model(c), c).loss for c in chunks]).mean()
    assert abs(float(per_chunk) - float(want.loss.detach())) > 1e-3


def test_accumulated_step_equals_the_whole_batch(tiny_world: Path, tmp_path: Path) -> None:
    """The grouping loss with the global batch's negatives: both losses couple samples across the chunks (the
    per-image negatives of the default are covered by the merge test above; one trainer run keeps the suite
    short)."""
    errors = check_exact_accumulation(METHOD, tiny_world, tmp_path, "loss.sgl_negatives=global")
    assert {"loss.logit_scale", "loss.logit_scale_local"} <= errors.keys()  # both temperatures compared
