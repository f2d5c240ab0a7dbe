"""Exact accumulation under 2 gloo ranks: ``accum_steps=4`` == ``accum_steps=1`` at global batch 64.

Both runs launch ``clip-train --preset smoke`` on 2 ranks (workers/train_worker.py), so every global batch is
the same 64 samples split the same way over the ranks; the features each rank gathers from the other (InfoNCE:
all columns with gradient; SigLIP: the ring) then come from cached chunks, and the parameters after 2 steps
must agree within 1e-5 of each tensor's largest value (AdamW eps 1e-3, see vlp_core.testing.accumulate).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.accumulate import worst_errors
from vlp_core.testing.dist import run_torchrun
from vlp_core.train.checkpoint import CheckpointManager

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "train_worker.py"


def _params(world: Path, out: Path, accum: int, kind: str) -> dict:
    run_torchrun(WORKER, 2, "--preset", "smoke", "--steps", "2", "--batch-size", "64", "--output-dir", str(out),
                 "--set", f"data.world_dir={world}", "--set", "train.progress=false", "--set", "eval.at_end=false",
                 "--set", f"train.accum_steps={accum}", "--set", "train.save_every=2", "--set", "optim.eps=1e-3",
                 "--set", f"loss.kind={kind}", timeout=240)
    return CheckpointManager.load(CheckpointManager(out / "checkpoints").latest())["model"]


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_two_ranks_accumulated_equals_whole_batch(tiny_world: Path, tmp_path: Path, kind: str) -> None:
    whole = _params(tiny_world, tmp_path / "whole", 1, kind)
    errors = worst_errors(_params(tiny_world, tmp_path / "exact", 4, kind), whole)
    bad = {k: v for k, v in errors.items() if v > 1e-5}
    assert not bad, bad
