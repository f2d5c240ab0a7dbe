"""Exact accumulation for DreamLIP under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

DreamLIP's smoke preset trains on 2 ranks (vlp_core.testing.accum_worker, one launch) with the grouping
loss's global negatives, so both losses gather the other rank's texts and images (its cached chunks included);
parameters after 2 steps agree within 1e-5 of each tensor's largest value (AdamW eps 1e-3, see
vlp_core.testing.accumulate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.accumulate import check_exact_accumulation_dist

pytestmark = pytest.mark.dist


def test_two_ranks_accumulated_equals_whole_batch(tiny_world: Path, tmp_path: Path) -> None:
    errors = check_exact_accumulation_dist("vlp_dreamlip", tiny_world, tmp_path, "loss.sgl_negatives=global")
    assert {"loss.logit_scale", "loss.logit_scale_local"} <= errors.keys()
