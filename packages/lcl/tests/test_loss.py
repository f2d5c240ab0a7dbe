"""The LCL objective vs float64 full-matrix references; zero contrastive pairs stays finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vlp_lcl.config import LclConfig
from vlp_lcl.loss import LclLoss, contrastive_capacity, contrastive_sum

F64 = torch.float64


def _features(n: int, valid: list[bool], seed: int = 0, tokens: int = 10):
    g = torch.Generator().manual_seed(seed)
    return {
        "image_latent": torch.randn(n, 6, generator=g, dtype=F64).requires_grad_(),
        "context": torch.randn(n, 6, generator=g, dtype=F64).requires_grad_(),
        "has_context": torch.tensor(valid),
        "gen_nll_sum": torch.tensor(23.0, dtype=F64, requires_grad=True), "gen_tokens": tokens,
    }


@pytest.mark.parametrize("valid", [
    [True, False, True, True, False, True],  # fewer images than the capacity (8): zero rows padded
    [False] * 5 + [True] + [False] * 9 + [True, True] + [False] * 4,  # 21 images, 3 pairs: rows dropped
])
def test_loss_matches_full_matrix_reference(valid: list[bool]) -> None:
    f = _features(len(valid), valid)
    loss_fn = LclLoss(LclConfig(contrastive_weight=0.3, generation_weight=0.7))
    out = loss_fn(f, {})
    m = torch.tensor(valid)
    x = F.normalize(f["image_latent"][m], dim=-1)
    y = F.normalize(f["context"][m], dim=-1)
    logits = (1 / 0.07) * x @ y.T
    labels = torch.arange(int(m.sum()))
    con = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    want = 0.3 * con + 0.7 * 23.0 / 10
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.parts["loss_con"], con)
    # Gradients of the image latents equal the reference's; invalid rows get exactly zero.
    out.loss.backward()
    g = f["image_latent"].grad.clone()
    fi = f["image_latent"].detach().clone().requires_grad_()
    x = F.normalize(fi[m], dim=-1)
    logits = (1 / 0.07) * x @ y.detach().T
    (0.3 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    torch.testing.assert_close(g, fi.grad)
    assert (g[~m] == 0).all()


def test_zero_pairs_is_finite_and_generation_only() -> None:
    f = _features(4, [False] * 4)
    out = LclLoss(LclConfig())(f, {})
    assert torch.isfinite(out.loss) and float(out.parts["loss_con"]) == 0.0
    out.loss.backward()
    for k in ("image_latent", "context"):
        assert torch.isfinite(f[k].grad).all() and (f[k].grad == 0).all()
    torch.testing.assert_close(out.loss, torch.tensor(2.3, dtype=F64))


def test_logit_scale_is_capped() -> None:
    loss_fn = LclLoss(LclConfig(max_logit_scale=20.0))
    with torch.no_grad():
        loss_fn.logit_scale.fill_(10.0)
    out = loss_fn(_features(3, [True] * 3), {})
    torch.testing.assert_close(out.parts["logit_scale"], torch.tensor(20.0))


def test_capacity_is_the_pair_count_rounded_up_and_checked() -> None:
    assert [contrastive_capacity(torch.tensor([True] * n + [False] * 3)) for n in (0, 1, 8, 9, 256)] == [
        8, 8, 8, 16, 256]
    f = _features(12, [True] * 9 + [False] * 3)
    with pytest.raises(ValueError, match="9 contrastive pairs on this rank exceed the capacity 8"):
        contrastive_sum(f["image_latent"], f["context"], f["has_context"], torch.tensor(0.0), capacity=8)
