"""Contrastive memory on image-text pairs: logits of about one row per image, at micro-batch 512, world 8.

The world of 8 ranks is simulated in one process: the loss module's gathers return this rank's block
followed by seven other ranks' (random features, their own context flags, padded to the same capacity), and
its max all-reduce of the pair count sees the other ranks' counts. A ``TorchDispatchMode`` records the
largest tensor any aten op produces in the forward and backward of the whole loss.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from vlp_lcl import loss as lcl_loss
from vlp_lcl.config import LclConfig

B, W, D = 512, 8, 64  # micro-batch (pairs: one image per row), simulated world, embedding width
ONE_ROW_PER_IMAGE = B * (W * B)  # elements of a [B, W*B] logits matrix: 512 x 4096


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (elements, shape) any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.shape = 0, ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def _simulate_world(monkeypatch: pytest.MonkeyPatch, counts: list[int], gen: torch.Generator) -> None:
    """Rank 0 of ``W``; the other ranks hold ``counts[1:]`` pairs (their valid rows first, as the loss packs)."""

    def all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> None:
        assert op == dist.ReduceOp.MAX and t.numel() == 1
        t.fill_(max(int(t), *counts[1:]))

    def others(x_KD: torch.Tensor, valid: bool) -> list[torch.Tensor]:
        K = x_KD.shape[0]
        out = []
        for n in counts[1:]:
            if valid:
                out.append((torch.arange(K) < n).to(x_KD.dtype))
            else:
                out.append(torch.nn.functional.normalize(torch.randn(K, *x_KD.shape[1:], generator=gen), dim=-1))
        return out

    monkeypatch.setattr(lcl_loss, "is_initialized", lambda: True)
    monkeypatch.setattr(lcl_loss, "get_world_size", lambda: W)
    monkeypatch.setattr(lcl_loss, "get_rank", lambda: 0)
    monkeypatch.setattr(lcl_loss, "dist", SimpleNamespace(all_reduce=all_reduce, ReduceOp=dist.ReduceOp))
    monkeypatch.setattr(lcl_loss, "all_gather_with_grad", lambda x: torch.cat([x, *others(x, False)]))
    monkeypatch.setattr(lcl_loss, "all_gather_no_grad", lambda v: torch.cat([v, *others(v, True)]))
    monkeypatch.setattr(lcl_loss, "all_reduce_sum", lambda t: t)


@pytest.mark.parametrize("img_first_prob", [0.5, 0.0])
def test_pair_logits_within_2x_of_one_row_per_image(monkeypatch: pytest.MonkeyPatch, img_first_prob: float) -> None:
    gen = torch.Generator().manual_seed(0)
    # Each LAION pair has one image; it is a contrastive pair unless drawn image-first.
    has_context_WB = torch.rand(W, B, generator=gen) >= img_first_prob
    counts = has_context_WB.sum(1).tolist()
    _simulate_world(monkeypatch, counts, gen)
    features = {
        "image_latent": torch.randn(B, D, generator=gen, requires_grad=True),
        "context": torch.randn(B, D, generator=gen, requires_grad=True),
        "has_context": has_context_WB[0],
        "gen_nll_sum": torch.tensor(100.0, requires_grad=True), "gen_tokens": 50,
    }
    monitor = _LargestTensor()
    with monitor:
        out = lcl_loss.LclLoss(LclConfig())(features, {})
        out.loss.backward()
    cap = lcl_loss.contrastive_capacity(has_context_WB[0])  # the simulated all-reduce: max over the 8 ranks
    rounded_max = 8 * math.ceil(max(counts) / 8)
    assert cap == rounded_max
    assert monitor.shape == (cap, W * cap)  # the largest tensor is the logits (the monitor does see them)
    assert monitor.largest * 4 <= 2 * ONE_ROW_PER_IMAGE * 4, (monitor.shape, counts)  # fp32 bytes, within 2x
    if img_first_prob == 0.5:  # about half the pairs are contrastive: the official code's B/2 x (W B/2)
        assert monitor.largest <= ONE_ROW_PER_IMAGE // 3
    assert int(out.parts["pairs"]) == counts[0] and torch.isfinite(out.loss)
    assert torch.isfinite(features["image_latent"].grad).all()
