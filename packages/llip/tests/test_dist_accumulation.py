"""Exact accumulation for Llip under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

Llip's smoke preset trains on 2 ranks with and without accumulation (vlp_core.testing.accum_worker, one
launch): in every chunk's loss the (query, target) ring carries the other rank's merged captions (its fresh
chunk and its cached ones) and sends their gradients back; parameters after 2 steps agree within 1e-5 of each
tensor's largest value (AdamW eps 1e-3, see vlp_core.testing.accumulate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.accumulate import check_exact_accumulation_dist

pytestmark = pytest.mark.dist


def test_two_ranks_accumulated_equals_whole_batch(tiny_world: Path, tmp_path: Path) -> None:
    errors = check_exact_accumulation_dist("vlp_llip", tiny_world, tmp_path)
    assert "loss.logit_scale" in errors and "loss.logit_bias" in errors
