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

__all__ = ["train_params", "worst_errors", "assert_close_params", "check_exact_accumulation", "dist_params",
           "check_exact_accumulation_dist"]


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


def assert_close_params(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every tensor within 1e-5 of its largest value; the errors. A tensor that stays at noise level (below
    1e-8 in both runs: a zero-initialised bias with an exact zero gradient, e.g. an attention-pooling key bias,
    to which softmax is shift-invariant) is checked to stay there instead (a relative error cannot judge
    noise)."""
    errors = worst_errors(got, ref)
    for key in [k for k in errors if float(ref[k].abs().max()) < 1e-8]:
        assert float(got[key].abs().max()) < 1e-8, key
        del errors[key]
    bad = {k: v for k, v in errors.items() if v > 1e-5}
    assert not bad, bad
    return errors


def check_exact_accumulation(method: Any, world: Path, folder: Path, *extra: str) -> dict[str, float]:
    """Assert the exact-accumulation equality for ``method`` (see the module docstring); the errors."""
    folder = Path(folder)
    whole = train_params(method, world, folder / "whole", 1, *extra)
    errors = assert_close_params(train_params(method, world, folder / "exact", 4, *extra), whole)
    assert any(k.startswith("loss.") for k in errors), "the loss's temperature is not compared"
    naive = dataclasses.replace(method, exact_accumulation=False)
    cut = worst_errors(train_params(naive, world, folder / "naive", 4, *extra), whole)
    assert max(cut.values()) > 1e-3, "cutting the loss per chunk agreed with the whole batch"
    return errors


def dist_params(method_module: str, world: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    """The parameters after 2 steps on 2 gloo ranks with ``accum_steps`` 1 and 4 (one torchrun launch)."""
    from vlp_core.testing.dist import run_torchrun
    from vlp_core.train.checkpoint import CheckpointManager

    sets = [a for item in extra for a in ("--set", item)]
    run_torchrun(Path(__file__).with_name("accum_worker.py"), 2, "--method", method_module, "--world", str(world),
                 "--out", str(out), "--accum", "1", "--accum", "4", *sets, timeout=240)
    whole, exact = (CheckpointManager.load(CheckpointManager(Path(out) / f"accum{k}" / "checkpoints").latest())
                    ["model"] for k in (1, 4))
    return whole, exact


def check_exact_accumulation_dist(method_module: str, world: Path, out: Path, *extra: str) -> dict[str, float]:
    """Under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64 (every parameter within
    1e-5 of its largest value after 2 steps); the errors."""
    whole, exact = dist_params(method_module, world, out, *extra)
    return assert_close_params(exact, whole)
