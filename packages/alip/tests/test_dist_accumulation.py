"""Exact accumulation for ALIP under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

ALIP's smoke preset trains on 2 ranks with and without accumulation (vlp_core.testing.accum_worker, one launch):
each rank's gate weights are sliced from the gathered global batch at its rank-batch rows, and H moves once
per step on the 64 samples (``after_step``); parameters and H after 2 steps agree within 1e-5 of each
tensor's largest value (AdamW eps 1e-3, see vlp_core.testing.accumulate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.accumulate import dist_params, worst_errors

pytestmark = pytest.mark.dist

H_KEYS = {"loss.h_tc", "loss.h_xt", "loss.h_xc"}


def test_two_ranks_accumulated_equals_whole_batch(noisy_world: Path, tmp_path: Path) -> None:
    whole, exact = dist_params("vlp_alip", noisy_world, tmp_path)
    assert all(float(whole[k]) < 1.0 for k in H_KEYS)  # H moved from its start value
    errors = worst_errors(exact, whole)
    assert errors.keys() >= H_KEYS
    bad = {k: v for k, v in errors.items() if v > 1e-5}
    assert not bad, bad
