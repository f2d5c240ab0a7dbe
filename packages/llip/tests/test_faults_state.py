"""Fault test: Llip's logit scale (its bias is unbounded, as in the official code)
pushed past a bound by a real optimizer step
comes back into ``[0, ln max_logit_scale]`` in the loss's ``after_step`` (the core's shared clamp)."""

from __future__ import annotations

import pytest
import torch
from vlp_llip import METHOD

from vlp_core.testing.bounds import check_temperatures

pytestmark = pytest.mark.faults


def test_temperatures_are_bounded_and_clamped_after_the_step() -> None:
    check_temperatures(METHOD, {"logit_scale"})


def test_bias_is_not_bounded() -> None:
    """The official loop clamps only the scale: a bias pushed far by a step stays where the step put it."""
    loss = METHOD.build_loss(METHOD.preset("smoke"))
    with torch.no_grad():
        loss.logit_bias.fill_(50.0)
    loss.after_step(torch.tensor(True))
    assert loss.logit_bias.item() == 50.0
