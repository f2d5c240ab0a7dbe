"""Exact accumulation through the trainer, for any method: ``accum_steps=4`` == ``accum_steps=1``.

:func:`check_exact_accumulation` trains a method's smoke preset twice on a shapes world (2 steps, global batch
64, fp32), once on whole batches and once in 4 chunks, and asserts that every parameter (the loss's
temperature and bias included) agrees within 1e-5 of the tensor's largest value; then once more with the loss
cut per chunk (``exact_accumulation`` off), which must differ, so the check can fail.

AdamW's ``eps`` is raised to 1e-3 for the comparison: with the default 1e-6, a gradient entry near zero (an
attention key bias has an exact gradient of zero, a fresh LayerNorm bias a tiny one) turns float32
summation-order noise into a step of about ``lr``, which measures the optimizer, not the accumulation. With
1e-3 the update is smooth in the gradient there, and every tensor is held to 1e-5.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

__all__ = ["train_params", "worst_errors", "check_exact_accumulation"]


def train_params(method: Any, world: Path, out: Path, accum: int, *extra: str) -> dict[str, torch.Tensor]:
    """``<m>-train --preset smoke`` for 2 steps at global batch 64 with ``accum`` chunks; the final parameters."""
    from vlp_core.cli import train_main
    from vlp_core.train.checkpoint import CheckpointManager

    args = ["--preset", "smoke", "--steps", "2", "--batch-size", "64", "--output-dir", str(out),
            "--set", f"data.world_dir={world}", "--set", "train.progress=false", "--set", "eval.at_end=false",
            "--set", f"train.accum_steps={accum}", "--set", "train.save_every=2", "--set", "optim.eps=1e-3"]
    for item in extra:
        args += ["--set", item]
    assert train_main(method, args) == 0
    return CheckpointManager.load(CheckpointManager(Path(out) / "checkpoints").latest())["model"]


def worst_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per floating tensor: ``max|got - ref| / max|ref|``."""
    return {k: float((got[k].double() - r.double()).abs().max() / (float(r.abs().max()) or 1.0))
            for k, r in ref.items() if r.is_floating_point()}


def check_exact_accumulation(method: Any, world: Path, folder: Path, *extra: str) -> dict[str, float]:
    """Assert the exact-accumulation equality for ``method`` (see the module docstring); the errors."""
    folder = Path(folder)
    whole = train_params(method, world, folder / "whole", 1, *extra)
    errors = worst_errors(train_params(method, world, folder / "exact", 4, *extra), whole)
    bad = {k: v for k, v in errors.items() if v > 1e-5}
    assert not bad, bad
    assert any(k.startswith("loss.") for k in errors), "the loss's temperature is not compared"
    naive = dataclasses.replace(method, exact_accumulation=False)
    cut = worst_errors(train_params(naive, world, folder / "naive", 4, *extra), whole)
    assert max(cut.values()) > 1e-3, "cutting the loss per chunk agreed with the whole batch"
    return errors
