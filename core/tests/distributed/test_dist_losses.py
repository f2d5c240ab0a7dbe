"""Distributed losses and collectives under torchrun (gloo, CPU) vs single-process float64 references.

The worker (workers/loss_worker.py) runs every check for one world size and reports the max relative
error over ranks; see its docstring for the setup. W=2 exercises the one-hop ring, W=3 an odd world (one
bidirectional round), W=4 a bidirectional round followed by the extra one-way hop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "loss_worker.py"
# Everything runs in float64, so the only differences are summation order: far below the 1e-5 budget.
TOL = 1e-9

LOSS_CHECKS = [
    f"{name}_{how}" for name in ("clip", "siglip_bidir", "siglip_shift") for how in ("manual", "ddp")
]
COMMON_CHECKS = ["info", "objects", "gather", "shift_1", "size_mismatch", *LOSS_CHECKS]


@pytest.mark.parametrize(
    "world",
    [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)],
)
def test_distributed_losses_match_single_process(world: int, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    run_torchrun(WORKER, world, "--out", str(out), timeout=150)
    result = json.loads(out.read_text())
    assert result["world_size"] == world
    errors: dict[str, float] = result["errors"]
    expected = COMMON_CHECKS + (["shift_2", "bidir"] if world >= 3 else [])
    # A check that silently did not run must not count as a pass.
    assert sorted(errors) == sorted(expected)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"checks over tolerance {TOL} at world size {world}: {bad}"
