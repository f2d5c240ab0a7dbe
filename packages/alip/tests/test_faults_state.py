"""Faults of ALIP's state: a NaN batch leaves the running averages H bit-identical (the staged values of the
skipped step never reach H), and the shared temperature pushed past a bound by the optimizer is clamped back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from vlp_alip import METHOD

from vlp_core.data.tario import iter_samples
from vlp_core.testing.bounds import bounded_names, push_past_bound
from vlp_core.train.loop import TrainStep, _optimizer_step, _to_device
from vlp_core.train.optim import build_optimizer
from vlp_core.train.parallel import split_scalar_groups
from vlp_core.train.setup import load_tokenizer

pytestmark = pytest.mark.faults

CPU = torch.device("cpu")


def _h(loss) -> list[torch.Tensor]:
    return [loss.h_tc.clone(), loss.h_xt.clone(), loss.h_xc.clone()]


def _fresh(cfg, tok):
    torch.manual_seed(0)
    module = TrainStep(METHOD.build_model(cfg, tok), METHOD.build_loss(cfg))
    optimizer = build_optimizer(module, cfg.optim, device=CPU)
    split_scalar_groups(optimizer)
    return module, optimizer


def _forward_backward(module, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    out = module(batch)
    out.loss.backward()
    return out


def _step(module, optimizer, batch, nonfinite) -> bool:
    """One trainer step: forward, backward, the NaN-guarded optimizer step, then after_step (as the loop)."""
    out = _forward_backward(module, optimizer, batch)
    skipped = _optimizer_step(module, optimizer, None, 1.0, nonfinite, {"loss": out.loss.detach()})
    module.loss.after_step(~skipped)
    return bool(skipped)


def test_nan_batch_leaves_h_unchanged(noisy_world: Path) -> None:
    cfg = METHOD.preset("smoke")
    tok = load_tokenizer(cfg, noisy_world)
    adapter = METHOD.build_adapter(cfg, tok)
    raw = list(iter_samples(str(noisy_world / "train" / "00000.tar")))[:24]
    b1, b2, b3 = (_to_device(adapter.collate([adapter(dict(s)) for s in raw[i:i + 8]]), CPU) for i in (0, 8, 16))
    bad = {**b2, "images": b2["images"].clone()}
    bad["images"][3] = float("nan")  # one image of the batch is NaN: its features, S and the staged H too

    module, optimizer = _fresh(cfg, tok)
    loss, nonfinite = module.loss, torch.zeros(())
    assert not _step(module, optimizer, b1, nonfinite)
    h1, params1 = _h(loss), {k: v.clone() for k, v in module.state_dict().items()}
    assert h1 != [torch.tensor(1.0)] * 3  # H moved from its start on the finite step

    out = _forward_backward(module, optimizer, bad)
    # The stage holds NaN where the image enters (S_xt, S_xc); S_tc (text vs caption) stays finite.
    assert not torch.isfinite(out.loss) and torch.isnan(loss.h_next[1:]).all()
    skipped = _optimizer_step(module, optimizer, None, 1.0, nonfinite, {"loss": out.loss.detach()})
    assert bool(skipped) and float(nonfinite) == 1
    loss.after_step(~skipped)
    for a, b in zip(_h(loss), h1):
        assert torch.equal(a, b)  # bit-identical
    for k, v in module.state_dict().items():
        assert torch.equal(v, params1[k]), k  # nothing else moved either (H are buffers of the state dict)
    assert torch.equal(loss.h_next, torch.stack(h1))  # the stage is reset: no NaN left for a later step

    assert not _step(module, optimizer, b3, nonfinite) and float(nonfinite) == 0
    # The same run without the NaN batch: H and every parameter bit-identical after the next step.
    ref, ref_opt = _fresh(cfg, tok)
    ref_nonfinite = torch.zeros(())
    assert not _step(ref, ref_opt, b1, ref_nonfinite) and not _step(ref, ref_opt, b3, ref_nonfinite)
    got, want = module.state_dict(), ref.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert all(math.isfinite(float(h)) for h in _h(loss))


@pytest.mark.parametrize("upper", [True, False])
def test_temperature_pushed_past_a_bound_comes_back(upper: bool) -> None:
    loss = METHOD.build_loss(METHOD.preset("smoke"))
    # Every learnable temperature is bounded.
    assert bounded_names(loss) == {n for n, _ in loss.named_parameters() if "logit_scale" in n} == {"logit_scale"}
    pushed, after, bound = push_past_bound(loss, "logit_scale", upper=upper)
    assert bound == (math.log(100.0) if upper else 0.0)
    assert (pushed > bound + 0.5) if upper else (pushed < bound - 0.5)  # the optimizer carried it out
    assert after == pytest.approx(bound, abs=1e-6) and 0.0 <= after <= math.log(100.0)
