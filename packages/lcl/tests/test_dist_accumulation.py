"""Exact accumulation for LCL under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

LCL's smoke preset trains on pairs and documents on 2 ranks with and without accumulation
(vlp_core.testing.accum_worker, one launch): every chunk's loss sees its rank's merged features, so the
capacity (max all-reduce), the gathered columns and the global pair and token counts are the whole step's;
parameters after 2 steps agree within 1e-5 of each tensor's largest value (AdamW eps 1e-3, see
vlp_core.testing.accumulate; the zero-gradient pooling biases are held at noise level).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.accumulate import check_exact_accumulation_dist

pytestmark = pytest.mark.dist


def test_two_ranks_accumulated_equals_whole_batch(tiny_world: Path, tmp_path: Path) -> None:
    data = f"{tiny_world}/train/{{00000..00001}}.tar::{tiny_world}/docs/00000.tar"
    errors = check_exact_accumulation_dist("vlp_lcl", tiny_world, tmp_path, f"data.train_data={data}",
                                           "data.train_weights=1::1")
    assert "loss.logit_scale" in errors
