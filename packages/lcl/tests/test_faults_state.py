"""Fault test: LCL's contrastive temperature
pushed past a bound by a real optimizer step
comes back into ``[0, ln max_logit_scale]`` in the loss's ``after_step`` (the core's shared clamp)."""

from __future__ import annotations

import pytest
from vlp_lcl import METHOD

from vlp_core.testing.bounds import check_temperatures

pytestmark = pytest.mark.faults


def test_temperatures_are_bounded_and_clamped_after_the_step() -> None:
    check_temperatures(METHOD, {"logit_scale"})
