"""ClipLoss / SigLipLoss (single process) vs float64 plain-loop references: values and gradients.

The references never build a logits matrix: InfoNCE is a per-row log-softmax loop, SigLIP an explicit double
loop over all (image, text) pairs, both on float64 Python-level scalars so they share no code with the
implementation.

Tensor-name legend:
    B: batch, D: embedding dim.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp_core.losses import ClipLoss, SigLipLoss, clip_loss, siglip_loss

B, D = 5, 4


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(sum(v[k] * v[k] for k in range(len(v))))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[k] * b[k] for k in range(len(a)))


def ref_clip(img_BD: torch.Tensor, txt_BD: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE by loops: mean over rows of -log softmax(row)[diag], both directions, halved."""
    imgs = [_unit(img_BD[i]) for i in range(len(img_BD))]
    txts = [_unit(txt_BD[j]) for j in range(len(txt_BD))]
    s = torch.exp(log_scale)
    total = 0.0
    for queries, keys in ((imgs, txts), (txts, imgs)):
        for i, q in enumerate(queries):
            row = [s * _dot(q, k) for k in keys]
            lse = torch.log(sum(torch.exp(z) for z in row))
            total = total + (lse - row[i])
    return total / (2 * len(imgs))


def ref_siglip(
    img_BD: torch.Tensor, txt_BD: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss by an explicit double loop over pairs: -sum log sigmoid(y_ij * z_ij) / B."""
    s = torch.exp(log_scale)
    total = 0.0
    for i in range(len(img_BD)):
        for j in range(len(txt_BD)):
            y = 1.0 if i == j else -1.0
            z = s * _dot(_unit(img_BD[i]), _unit(txt_BD[j])) + bias
            total = total - torch.log(1.0 / (1.0 + torch.exp(-y * z)))
    return total / len(img_BD)


def _features(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, D, generator=g, dtype=torch.float64)
    # Correlated text so the positives matter and the loss is not near its uniform value.
    txt = img + 0.8 * torch.randn(B, D, generator=g, dtype=torch.float64)
    return img.to(dtype), txt.to(dtype)


def _grads_ref(fn, img: torch.Tensor, txt: torch.Tensor, *scalars: float):
    leaves = [img.double().clone().requires_grad_(True), txt.double().clone().requires_grad_(True)]
    leaves += [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in scalars]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_clip_loss_matches_loop_reference(dtype: torch.dtype, tol: float) -> None:
    img, txt = _features(dtype)
    module = ClipLoss(init_temperature=0.3).to(dtype)
    img_l, txt_l = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    out = module(img_l, txt_l)
    out.loss.backward()

    # The parameter was created in fp32: compare at its stored value, not at the exact log(1/0.3).
    ref_loss, (g_img, g_txt, g_scale) = _grads_ref(ref_clip, img, txt, module.logit_scale.item())
    assert out.loss.dtype == dtype
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(img_l.grad.double(), g_img, rtol=tol, atol=tol * g_img.abs().max().item())
    torch.testing.assert_close(txt_l.grad.double(), g_txt, rtol=tol, atol=tol * g_txt.abs().max().item())
    torch.testing.assert_close(module.logit_scale.grad.double(), g_scale, rtol=tol, atol=0)
    assert out.parts["logit_scale"].item() == pytest.approx(1 / 0.3, rel=1e-6)
    assert torch.equal(out.parts["loss_contrastive"], out.loss.detach())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_siglip_loss_matches_loop_reference(dtype: torch.dtype, tol: float) -> None:
    img, txt = _features(dtype, seed=1)
    # Bias -2 / scale 4 (not the -10 / 10 defaults) keep every gradient well away from zero.
    module = SigLipLoss(init_logit_scale=math.log(4.0), init_bias=-2.0).to(dtype)
    img_l, txt_l = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    out = module(img_l, txt_l)
    out.loss.backward()

    ref_loss, (g_img, g_txt, g_scale, g_bias) = _grads_ref(
        ref_siglip, img, txt, module.logit_scale.item(), module.logit_bias.item()
    )
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(img_l.grad.double(), g_img, rtol=tol, atol=tol * g_img.abs().max().item())
    torch.testing.assert_close(txt_l.grad.double(), g_txt, rtol=tol, atol=tol * g_txt.abs().max().item())
    torch.testing.assert_close(module.logit_scale.grad.double(), g_scale, rtol=tol, atol=0)
    torch.testing.assert_close(module.logit_bias.grad.double(), g_bias, rtol=tol, atol=0)
    assert set(out.parts) == {"loss_contrastive", "logit_scale", "logit_bias"}
    torch.testing.assert_close(out.parts["logit_bias"].double(), torch.tensor(-2.0, dtype=torch.float64))


def test_default_siglip_init_matches_reference() -> None:
    # The defaults (scale 10, bias -10) are what training starts from: check them too.
    img, txt = _features(torch.float64, seed=2)
    module = SigLipLoss().double()
    loss = module(img, txt).loss
    assert module.logit_scale.item() == pytest.approx(math.log(10.0)) and module.logit_bias.item() == -10.0
    ref = ref_siglip(img, txt, module.logit_scale.detach(), module.logit_bias.detach())
    torch.testing.assert_close(loss, ref.double(), rtol=1e-10, atol=0)


def test_functional_equals_module() -> None:
    img, txt = _features(torch.float32, seed=3)
    clip = ClipLoss(init_temperature=0.1)
    assert torch.equal(clip(img, txt).loss, clip_loss(img, txt, clip.logit_scale))
    sig = SigLipLoss(ring="shift")
    assert torch.equal(sig(img, txt).loss, siglip_loss(img, txt, sig.logit_scale, sig.logit_bias))


def test_scale_is_clamped_in_forward_and_by_clamp_() -> None:
    img, txt = _features(torch.float64, seed=4)
    module = ClipLoss(init_temperature=1 / 400.0, max_logit_scale=100.0).double()  # 400 > cap 100
    out = module(img, txt)
    out.loss.backward()
    ref = ref_clip(img, txt, torch.tensor(math.log(100.0), dtype=torch.float64))
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(out.parts["logit_scale"], torch.tensor(100.0, dtype=torch.float64))
    assert module.logit_scale.grad.item() == 0.0  # past the cap the scale must not be pushed further
    assert module.logit_scale.item() == pytest.approx(math.log(400.0))  # forward leaves the parameter alone
    module.clamp_()
    assert module.logit_scale.item() == pytest.approx(math.log(100.0))

    # Below the cap neither forward nor clamp_ changes anything.
    low = SigLipLoss(init_logit_scale=math.log(20.0), max_logit_scale=100.0)
    low.clamp_()
    assert low.logit_scale.item() == pytest.approx(math.log(20.0))
    assert low(img.float(), txt.float()).parts["logit_scale"].item() == pytest.approx(20.0)


def test_frozen_temperature_and_bias() -> None:
    assert not ClipLoss(learn_temperature=False).logit_scale.requires_grad
    sig = SigLipLoss(learn=False)
    assert not sig.logit_scale.requires_grad and not sig.logit_bias.requires_grad
    img, txt = _features(torch.float32, seed=5)
    img.requires_grad_(True)
    sig(img, txt).loss.backward()  # features still get gradients
    assert img.grad is not None and sig.logit_scale.grad is None


def test_bf16_inputs_are_normalised_in_fp32() -> None:
    img, txt = _features(torch.bfloat16, seed=6)
    for module in (ClipLoss(), SigLipLoss()):
        loss = module(img, txt).loss
        assert loss.dtype == torch.float32
        # Same bf16 values, upcast first: only fp32 rounding may differ (a bf16 normalisation would not).
        want = module(img.float(), txt.float()).loss
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)


def test_loss_is_invariant_to_feature_norm() -> None:
    # Normalisation happens inside: scaling rows must not change the loss.
    img, txt = _features(torch.float64, seed=7)
    row_scales = torch.linspace(0.1, 10.0, B, dtype=torch.float64)[:, None]
    for module in (ClipLoss().double(), SigLipLoss().double()):
        torch.testing.assert_close(
            module(img * row_scales, txt).loss, module(img, txt).loss, rtol=1e-12, atol=0
        )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="ring"):
        SigLipLoss(ring="reduce")
    with pytest.raises(ValueError, match="init_temperature"):
        ClipLoss(init_temperature=0.0)
    img, txt = _features(torch.float32)
    with pytest.raises(ValueError, match="same"):
        ClipLoss()(img, txt[:-1])


def test_reference_is_sensitive() -> None:
    # Guard against a reference that would agree with anything: a wrong pairing must change the loss.
    img, txt = _features(torch.float64, seed=8)
    perm = torch.roll(torch.arange(B), 1)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    assert abs(ref_clip(img, txt[perm], scale) - ref_clip(img, txt, scale)) > 1e-3
    assert abs(clip_loss(img, txt[perm], scale) - clip_loss(img, txt, scale)) > 1e-3
    # And the plain-matrix formula agrees with the loop, so the loop itself is what we think it is.
    zi, zt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    logits = scale.exp() * zi @ zt.T
    lbl = torch.arange(B)
    torch.testing.assert_close(
        ref_clip(img, txt, scale), (F.cross_entropy(logits, lbl) + F.cross_entropy(logits.T, lbl)) / 2
    )
