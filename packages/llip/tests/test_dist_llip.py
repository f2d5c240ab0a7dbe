"""Llip under torchrun (gloo, CPU): W processes give the loss and gradients of one process on the global batch.

The worker (workers/llip_loss_worker.py) compares every rank's result with the pair-by-pair float64
reference; this side also compares the averaged gradients with the blockwise loss run in this single
process on the whole batch. W=2 is one ring hop; W=3 uses a bidirectional round.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKERS = Path(__file__).parent / "workers"
sys.path.insert(0, str(WORKERS))
TOL = 1e-9  # float64 everywhere: only summation order differs


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_distributed_llip_matches_single_process(world: int, tmp_path: Path) -> None:
    from llip_loss_worker import build, global_batch, rel_err

    out = tmp_path / "result.pt"
    run_torchrun(WORKERS / "llip_loss_worker.py", world, "--out", str(out), timeout=150)
    result = torch.load(out, weights_only=False)
    assert result["world_size"] == world
    assert sorted(result["errors"]) == ["bidir_ddp", "bidir_manual", "shift_ddp", "shift_manual"]
    bad = {k: v for k, v in result["errors"].items() if not v <= TOL}
    assert not bad, f"over tolerance {TOL} vs the pairwise reference at world size {world}: {bad}"

    # the same global batch through the blockwise loss in this one process (no process group)
    single = build("bidir")
    loss = single(global_batch(3 * world)).loss
    loss.backward()
    for key, got in result["results"].items():
        assert rel_err(got["loss"], loss) <= TOL, key
        for name, p in single.named_parameters():
            if p.grad is not None:
                assert rel_err(got[name], p.grad) <= TOL, (key, name)
