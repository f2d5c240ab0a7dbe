"""ALIP's loss under torchrun (gloo, CPU): 2 processes give the loss, gradients, running averages and gate
statistics of 1 process on the same global batch (and of the plain float64 reference)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "alip_dist_worker.py"
TOL = 1e-9  # float64 throughout: only summation order differs


def launch(world: int, tmp_path: Path) -> dict:
    out = tmp_path / f"w{world}.json"
    run_torchrun(WORKER, world, "--out", str(out), timeout=150)
    return json.loads(out.read_text())


def test_two_processes_match_one(tmp_path: Path) -> None:
    two = launch(2, tmp_path)
    assert two["world_size"] == 2
    checks = [f"{how}_step{s}{x}" for how in ("manual", "ddp") for s in (1, 2) for x in ("", "_both_branches")]
    assert sorted(two["errors"]) == sorted(checks)  # a check that did not run must not pass
    bad = {k: v for k, v in two["errors"].items() if not v <= TOL}
    assert not bad, f"2-process checks against the float64 reference over {TOL}: {bad}"
    # the same global batch in one process (world size 1 under torchrun): identical loss and gradients
    one = launch(1, tmp_path)
    assert not {k: v for k, v in one["errors"].items() if not v <= TOL}
    for key, ref in one["values"].items():
        got = two["values"][key]
        assert len(got) == len(ref)
        assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL * max(abs(b) for b in ref), key
