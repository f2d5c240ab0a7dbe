"""Per-parameter ``lr_scale`` (layer-wise lr decay): extra optimizer groups that follow the schedule."""

import pytest
import torch
from torch import nn

from vlp_core.clip import METHOD
from vlp_core.train.optim import build_optimizer, build_scheduler, param_groups


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_without_lr_scale_the_two_groups_are_unchanged():
    groups = param_groups(_net(), 0.1)
    assert len(groups) == 2 and all("lr" not in g for g in groups)


def test_lr_scale_groups_get_scaled_lr_and_keep_weight_decay_rules():
    net = _net()
    net[0].weight.lr_scale = 0.25
    net[0].bias.lr_scale = 0.25
    cfg = METHOD.preset("smoke").optim
    cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.schedule = 0.01, 0.1, 0, "constant"
    opt = build_optimizer(net, cfg, device=torch.device("cpu"))
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(net[0].weight)]["lr"] == pytest.approx(0.0025)
    assert by_param[id(net[0].weight)]["weight_decay"] == 0.1
    assert by_param[id(net[0].bias)]["weight_decay"] == 0.0
    assert by_param[id(net[2].weight)]["lr"] == pytest.approx(0.01)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    # The effect: a plain AdamW at lr * scale moves the weight identically.
    ref = nn.Linear(3, 4)
    ref.load_state_dict(net[0].state_dict())
    ref_opt = torch.optim.AdamW([{"params": [ref.weight], "weight_decay": 0.1}], lr=0.0025,
                                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    x = torch.randn(5, 3)
    net(x).sum().backward()
    ref_out = net[2](net[1](ref(x))).sum()
    ref_out.backward()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(net[0].weight, ref.weight)


def test_schedule_scales_every_group_alike():
    net = _net()
    net[2].weight.lr_scale = 0.5
    cfg = METHOD.preset("smoke").optim
    cfg.lr, cfg.warmup_steps, cfg.schedule = 0.01, 4, "cosine"
    opt = build_optimizer(net, cfg, device=torch.device("cpu"))
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(6):
        opt.step()
        sched.step()
    base = opt.param_groups[0]["lr"]
    scaled = next(g for g in opt.param_groups if g.get("lr_scale") == 0.5)["lr"]
    assert scaled == pytest.approx(0.5 * base) and 0 < base < 0.01


def test_lr_scale_without_base_lr_is_a_clear_error():
    net = _net()
    net[0].weight.lr_scale = 0.5
    with pytest.raises(ValueError, match="lr_scale"):
        param_groups(net, 0.1)
