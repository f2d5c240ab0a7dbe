"""Exact accumulation through the trainer: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64 for ALIP,
parameters and the running averages H (updated once per step on the whole batch, by ``after_step``)."""

from __future__ import annotations

from pathlib import Path

from vlp_alip import METHOD

from vlp_core.testing.accumulate import check_exact_accumulation


def test_accumulated_step_equals_the_whole_batch(noisy_world: Path, tmp_path: Path) -> None:
    errors = check_exact_accumulation(METHOD, noisy_world, tmp_path)
    assert {"loss.h_tc", "loss.h_xt", "loss.h_xc"} <= errors.keys()  # H is compared too (within 1e-5)
