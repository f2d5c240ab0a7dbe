"""The GPU paths exist and are chosen automatically on CUDA; fp32 on the CPU."""

import pytest
import torch

from vlp_core.clip import METHOD
from vlp_core.train import loop
from vlp_core.train.optim import build_optimizer, lr_at


def test_precision_is_bf16_on_cuda_and_fp32_on_cpu(monkeypatch):
    cfg = METHOD.preset("smoke")
    _, precision = loop._autocast(cfg, torch.device("cpu"))
    assert precision == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    ctx, precision = loop._autocast(cfg, torch.device("cuda"))
    assert precision == "bf16" and isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16


def test_fused_adamw_on_cuda_only():
    module = torch.nn.Linear(4, 4)
    cfg = METHOD.preset("smoke").optim
    assert build_optimizer(module, cfg, device=torch.device("cuda")).defaults.get("fused") is True
    assert not build_optimizer(module, cfg, device=torch.device("cpu")).defaults.get("fused")


def test_weight_decay_groups():
    model = METHOD.build_model(METHOD.preset("smoke"), type("T", (), {"vocab_size": 50, "pad_id": 0})())
    opt = build_optimizer(model, METHOD.preset("smoke").optim, device=torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in decay["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert any("pos_embed" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warmup_then_cosine_to_floor():
    cfg = METHOD.preset("smoke").optim
    cfg.warmup_steps, cfg.min_lr_ratio = 10, 0.1
    assert lr_at(0, total=110, cfg=cfg) == pytest.approx(0.1)
    assert lr_at(9, total=110, cfg=cfg) == pytest.approx(1.0)
    assert lr_at(60, total=110, cfg=cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(110, total=110, cfg=cfg) == pytest.approx(0.1)


def test_nan_guard_skips_non_finite_step_on_cpu():
    module = torch.nn.Linear(3, 1)
    opt = build_optimizer(module, METHOD.preset("smoke").optim, device=torch.device("cpu"))
    before = module.weight.detach().clone()
    module(torch.ones(2, 3)).sum().backward()
    module.weight.grad[0, 0] = float("nan")
    counter = torch.zeros(())
    loop._optimizer_step(module, opt, None, 1.0, counter, {"loss": torch.tensor(1.0)})
    assert torch.equal(module.weight, before) and counter.item() == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_with_fused_found_inf_skips_on_device():
    module = torch.nn.Linear(3, 1).cuda()
    opt = build_optimizer(module, METHOD.preset("smoke").optim, device=torch.device("cuda"))
    before = module.weight.detach().clone()
    module(torch.ones(2, 3, device="cuda")).sum().backward()
    module.weight.grad[0, 0] = float("inf")
    counter = torch.zeros((), device="cuda")
    loop._optimizer_step(module, opt, None, 1.0, counter, {"loss": torch.tensor(1.0, device="cuda")})
    assert torch.equal(module.weight, before) and counter.item() == 1
