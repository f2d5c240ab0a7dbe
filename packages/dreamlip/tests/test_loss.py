"""The losses against plain-loop float64 references (tests/workers/reference.py) and the CLIP loss."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_grouped, ref_grouping_loss, ref_multi_positive, seeded
from vlp_dreamlip.config import DreamLipConfig
from vlp_dreamlip.loss import (
    DreamLipLoss,
    grouped_embeddings,
    grouping_weights,
    multi_positive_loss,
    subcaption_grouping_loss,
)

from vlp_core.losses import clip_loss

F64 = torch.float64
SCALE = torch.tensor(math.log(1 / 0.3), dtype=F64)  # a soft temperature: every term matters


@pytest.mark.parametrize("t", [1, 3])
def test_multi_positive_loss_matches_loop(t):
    img, txt = seeded(1, 5, 6), seeded(2, 5, t, 6)
    got = multi_positive_loss(img, txt, SCALE)
    assert got.item() == pytest.approx(ref_multi_positive(img, txt, float(SCALE)), rel=1e-10)


def test_multi_positive_with_k0_is_the_clip_loss():
    img, txt = seeded(3, 7, 6), seeded(4, 7, 6)
    assert torch.allclose(multi_positive_loss(img, txt[:, None], SCALE), clip_loss(img, txt, SCALE), rtol=1e-12)
    # Through the module too, with the SGL off: K = 0 DreamLIP is CLIP on the raw captions.
    mod = DreamLipLoss(DreamLipConfig(num_subcaptions=0, sgl_weight=0.0)).to(F64)
    out = mod({"image_features": img, "text_features": txt[:, None]}, {})
    assert torch.allclose(out.loss, clip_loss(img, txt, mod.logit_scale), rtol=1e-12)
    assert mod.logit_scale_local is None and "loss_sgl" not in out.parts


def test_multi_positive_slots_are_not_interchangeable_across_images():
    """Slot j of image i is a positive of image i only: moving it to another image raises the loss."""
    img = torch.eye(4, dtype=F64)
    txt = img[:, None].repeat(1, 3, 1) + 0.01 * seeded(5, 4, 3, 4)
    aligned = multi_positive_loss(img, txt, SCALE)
    shuffled = txt.permute(1, 0, 2).reshape(4, 3, 4)  # the (T, G) -> (G, T) reshape without permute
    assert multi_positive_loss(img, shuffled, SCALE) > aligned + 0.1


@pytest.mark.parametrize("sigma", [0.0, 0.6])
def test_grouped_embeddings_match_loop(sigma):
    txt, patches = seeded(6, 3, 4, 5), seeded(7, 3, 6, 5)
    t = txt / txt.norm(dim=-1, keepdim=True)
    p = patches / patches.norm(dim=-1, keepdim=True)
    w = grouping_weights(t, p, sigma)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, dtype=F64))
    assert ((w > 0).sum(-1) < 6).all()  # at least the least similar patch is dropped
    g = grouped_embeddings(w, p)
    ref = ref_grouped(txt, patches, sigma)
    for i in range(3):
        for j in range(4):
            assert torch.allclose(g[i, j], ref[i][j], atol=1e-12)


@pytest.mark.parametrize("negatives", ["image", "global"])
@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_grouping_loss_matches_loop(negatives, sigma):
    txt, patches = seeded(8, 4, 3, 5), seeded(9, 4, 6, 5)
    got = subcaption_grouping_loss(txt, patches, SCALE, sigma=sigma, negatives=negatives)
    ref = ref_grouping_loss(txt, patches, float(SCALE), sigma=sigma, negatives=negatives)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_grouping_pairs_each_text_with_its_own_image():
    """Text (i, j) equals patch n(i, j) of image i and nothing else: its map must peak there.

    The official code views the (T, G, C) stack as (G, T, C) without a permute, which pairs texts with
    other images' patches; this test fails for that layout (checked below)."""
    g, t, n = 3, 4, 8
    patches = torch.eye(g * n, dtype=F64)[: g * n].view(g, n, g * n)  # every patch its own direction
    target = torch.tensor([[(i + 2 * j) % n for j in range(t)] for i in range(g)])
    txt = torch.stack([torch.stack([patches[i, target[i, j]] for j in range(t)]) for i in range(g)])
    w = grouping_weights(txt, patches)
    assert torch.equal(w.argmax(-1), target)
    assert torch.allclose(w.amax(-1), torch.ones(g, t, dtype=F64))  # one patch gets all the weight
    # The buggy layout: texts stacked slot-major, then viewed as image-major.
    buggy = txt.permute(1, 0, 2).reshape(t, g, -1).reshape(g, t, -1)
    assert not torch.equal(grouping_weights(buggy, patches).argmax(-1), target)
    # And the SGL is near zero only for the right pairing.
    right = subcaption_grouping_loss(txt, patches, torch.tensor(math.log(50.0), dtype=F64))
    wrong = subcaption_grouping_loss(buggy, patches, torch.tensor(math.log(50.0), dtype=F64))
    assert right < 1e-6 < wrong


@pytest.mark.parametrize("negatives", ["image", "global"])
def test_duplicates_count_once_and_are_not_negatives(negatives):
    """A batch whose repeated texts are masked equals the loss over the unique texts alone."""
    txt, patches = seeded(10, 3, 4, 5), seeded(11, 3, 6, 5)
    txt[0, 3] = txt[0, 1]  # image 0: slot 3 repeats slot 1
    txt[2, 1] = txt[2, 2] = txt[2, 0]  # image 2: slots 1, 2 repeat the raw caption
    ids = torch.arange(4).repeat(3, 1)
    ids[0, 3], ids[2, 1], ids[2, 2] = 1, 0, 0
    keep = [[0, 1, 2], [0, 1, 2, 3], [0, 3]]
    got = subcaption_grouping_loss(txt, patches, SCALE, caption_ids_BT=ids, negatives=negatives)
    ref = ref_grouping_loss(txt, patches, float(SCALE), negatives=negatives, keep=keep)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    unmasked = subcaption_grouping_loss(txt, patches, SCALE, caption_ids_BT=ids, negatives=negatives,
                                        mask_duplicates=False)
    assert unmasked.item() == pytest.approx(ref_grouping_loss(txt, patches, float(SCALE), negatives=negatives))
    assert unmasked.item() != pytest.approx(got.item())


def test_sgl_image_negatives_are_local_to_each_image():
    """Within-image form: image 1's term does not depend on image 0's features."""
    txt, patches = seeded(12, 2, 3, 5).requires_grad_(), seeded(13, 2, 6, 5)
    ids = torch.arange(3).repeat(2, 1)
    loss = subcaption_grouping_loss(txt, patches, SCALE, caption_ids_BT=ids)
    (grad,) = torch.autograd.grad(loss, txt)
    single = subcaption_grouping_loss(txt[1:], patches[1:], SCALE)
    (grad1,) = torch.autograd.grad(single, txt)
    assert torch.allclose(grad[1] * 2, grad1[1], atol=1e-12)  # batch mean of 2 vs 1


def test_module_combines_weighted_losses_and_caps_temperatures():
    cfg = DreamLipConfig(num_subcaptions=2, mpcl_weight=0.7, sgl_weight=0.3, max_logit_scale=20.0,
                         init_temperature=0.01, sgl_init_temperature=0.5)
    mod = DreamLipLoss(cfg).to(F64)
    feats = {"image_features": seeded(14, 4, 5), "text_features": seeded(15, 4, 3, 5),
             "patch_features": seeded(16, 4, 6, 5)}
    out = mod(feats, {"caption_ids": torch.arange(3).repeat(4, 1)})
    cap = torch.tensor(math.log(20.0), dtype=F64)
    mp = multi_positive_loss(feats["image_features"], feats["text_features"], cap)  # 1/0.01 capped at 20
    sg = subcaption_grouping_loss(feats["text_features"], feats["patch_features"], torch.tensor(math.log(2.0)))
    assert torch.allclose(out.loss, 0.7 * mp + 0.3 * sg, rtol=1e-10)
    assert out.parts["logit_scale"].item() == pytest.approx(20.0)
    assert out.parts["logit_scale_local"].item() == pytest.approx(2.0)
    out.loss.backward()
    assert mod.logit_scale.grad.item() == 0.0  # past the cap: no gradient, like clamping after each step
    assert mod.logit_scale_local.grad.abs().item() > 0
    with pytest.raises(ValueError, match="patch_features"):
        mod({k: v for k, v in feats.items() if k != "patch_features"}, {})


def test_config_rejects_bad_values():
    for bad in (dict(num_subcaptions=-1), dict(sgl_sigma=1.0), dict(sgl_weight=-1.0),
                dict(init_temperature=0.0), dict(caption_keys=" ")):
        with pytest.raises(ValueError, match="loss\\."):
            DreamLipConfig(**bad).validate()
