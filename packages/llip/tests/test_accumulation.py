"""Exact accumulation through the trainer: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

Llip's features (image keys and folded values, caption query and target) are batch-first, so the chunks'
features concatenate to the whole batch's and the blockwise loss, divided by the merged rank batch, gives the
whole batch's gradient (:func:`vlp_core.testing.accumulate.check_exact_accumulation`, which also checks that
cutting the loss per chunk differs). The factorised variants use the core's SigLIP loss, checked in the core.
"""

from __future__ import annotations

from pathlib import Path

from vlp_llip import METHOD

from vlp_core.testing.accumulate import check_exact_accumulation


def test_accumulated_step_equals_the_whole_batch(tiny_world: Path, tmp_path: Path) -> None:
    # The smoke preset's block side 8 < the chunk of 16: several checkpointed blocks per chunk and per batch.
    errors = check_exact_accumulation(METHOD, tiny_world, tmp_path)
    assert "loss.logit_scale" in errors and "loss.logit_bias" in errors
