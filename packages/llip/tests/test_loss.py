"""The blockwise Llip loss against the pair-by-pair float64 reference, memory and module behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from llip_reference import assert_close_rel, reference_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from vlp_llip import METHOD, LlipLoss, LlipModel, llip_loss

F64 = torch.float64


def tiny_model(*, use_norm: bool = False, K: int = 3, heads: int = 2, D: int = 8, tau: float = 2.0,
               variant: str = "llip") -> LlipModel:
    cfg = METHOD.preset("smoke")
    cfg.model.vision.extra_tokens, cfg.model.embed_dim = K, D
    cfg.loss.heads, cfg.loss.use_norm, cfg.loss.tau, cfg.loss.variant = heads, use_norm, tau, variant
    torch.manual_seed(0)
    model = LlipModel(cfg.model, cfg.loss, vocab_size=50, pad_id=0).to(F64)
    with torch.no_grad():  # LayerNorms away from identity, so a wrong norm placement would show
        for name, p in model.named_parameters():
            if "norm" in name and not name.startswith(("visual", "text.")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def head_params(model: LlipModel) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(("visual", "text."))]


def features(model: LlipModel, h_NKW: torch.Tensor, g_NW: torch.Tensor):
    return (model.mixture.keys(h_NKW), model.mixture.folded_values(h_NKW), model.query_from_hidden(g_NW),
            model.text_projection(g_NW))


@pytest.mark.parametrize("use_norm", [False, True])
@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_blockwise_loss_and_gradients_match_pairwise_reference(use_norm: bool, use_checkpoint: bool) -> None:
    model = tiny_model(use_norm=use_norm)
    N, K, W = 5, 3, 32  # 5 rows in chunks of 2: ragged image and text blocks
    gen = torch.Generator().manual_seed(1)
    h_NKW = torch.randn(N, K, W, generator=gen, dtype=F64, requires_grad=True)
    g_NW = torch.randn(N, W, generator=gen, dtype=F64, requires_grad=True)
    scale = torch.tensor(math.log(4.0), dtype=F64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=F64, requires_grad=True)  # far from -10: bias/scale grads are not ~0
    inputs = [h_NKW, g_NW, scale, bias] + [p for _, p in head_params(model)]
    names = ["h", "g", "logit_scale", "logit_bias"] + [n for n, _ in head_params(model)]

    loss = llip_loss(*features(model, h_NKW, g_NW), scale, bias, tau=2.0, chunk=2, use_checkpoint=use_checkpoint)
    grads = torch.autograd.grad(loss, inputs)
    ref = reference_loss(model, h_NKW, g_NW, scale, bias, tau=2.0)
    ref_grads = torch.autograd.grad(ref, inputs)

    assert_close_rel(loss, ref, 1e-11, "loss")
    for name, a, b in zip(names, grads, ref_grads):
        assert_close_rel(a, b, 1e-9, f"grad {name}")


def test_chunk_size_does_not_change_the_loss() -> None:
    model = tiny_model()
    gen = torch.Generator().manual_seed(2)
    h_NKW, g_NW = torch.randn(7, 3, 32, generator=gen, dtype=F64), torch.randn(7, 32, generator=gen, dtype=F64)
    scale, bias = torch.tensor(2.0, dtype=F64), torch.tensor(-3.0, dtype=F64)
    losses = [llip_loss(*features(model, h_NKW, g_NW), scale, bias, tau=2.0, chunk=c) for c in (1, 3, 7, 100)]
    for other in losses[1:]:
        assert_close_rel(other, losses[0], 1e-12, "loss by chunk")


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("chunk", [8, 32])
def test_no_batch_by_batch_by_dim_tensor_in_forward_or_backward(chunk: int) -> None:
    model = tiny_model(K=2, D=16).float()
    N = 32
    h_NKW = torch.randn(N, 2, 32, requires_grad=True)
    g_NW = torch.randn(N, 32, requires_grad=True)
    feats = features(model, h_NKW, g_NW)
    monitor = _LargestTensor()
    with monitor:
        loss = llip_loss(*feats, torch.tensor(2.0), torch.tensor(-10.0), tau=5.0, chunk=chunk)
        loss.backward()
    full = N * N * 16
    if chunk == N:  # the monitor does see a B x B x D block when the chunk is the whole batch
        assert monitor.largest >= full
    else:
        assert monitor.largest <= full // 8, monitor.largest


def test_logit_scale_and_bias_initialisation_and_clamp() -> None:
    cfg = METHOD.preset("llip_b16_k32").loss  # the paper's initialisation
    loss = LlipLoss(cfg)
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss.logit_bias.item() == -10.0
    assert LlipLoss(METHOD.preset("demo").loss).logit_bias.item() == -4.0  # the demo's choice
    register = LlipLoss(METHOD.preset("register_demo").loss)  # SigLIP on one token: SigLIP's scale 10
    assert register.logit_scale.item() == pytest.approx(math.log(10))
    assert register.logit_bias.item() == -4.0
    with torch.no_grad():
        loss.logit_scale.fill_(7.0)
    clamped = loss.clamped_scale()
    assert clamped.item() == pytest.approx(math.log(100.0))
    clamped.backward()
    assert loss.logit_scale.grad.item() == 0.0  # no gradient past the cap


def test_loss_module_reports_parts_and_matches_functional() -> None:
    model = tiny_model().float()
    batch = {"images": torch.randn(4, 3, 32, 32), "tokens": torch.randint(1, 50, (4, 16))}
    feats = model(batch)
    cfg = METHOD.preset("smoke").loss
    cfg.tau = 2.0
    module = LlipLoss(cfg)
    out = module(feats, batch)
    want = llip_loss(feats["image_keys"], feats["image_values"], feats["text_query"], feats["text_target"],
                     module.logit_scale, module.logit_bias, tau=2.0, chunk=cfg.chunk)
    torch.testing.assert_close(out.loss, want)
    assert set(out.parts) == {"loss_contrastive", "logit_scale", "logit_bias"}


def test_llip_loss_rejects_inconsistent_shapes() -> None:
    k, u = torch.zeros(2, 2, 3, 4), torch.zeros(2, 2, 3, 8)
    with pytest.raises(ValueError, match="inconsistent shapes"):
        llip_loss(k, u, torch.zeros(2, 2, 5), torch.zeros(2, 8), torch.tensor(1.0), torch.tensor(0.0), tau=1.0)
