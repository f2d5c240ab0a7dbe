"""A full disk at checkpoint write in a 2-rank torchrun run (ENOSPC injected inside the writer, test hook
``VLP_DEBUG_FAIL_SAVE_AT_STEP``): nothing partial is left, the earlier checkpoints are intact, and every rank
stops with one message (``train.on_save_error=stop``) or training goes on to the end (``warn``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlp_core.cli import EXIT_ERROR
from vlp_core.testing.dist import run_torchrun
from vlp_core.train.checkpoint import CheckpointManager

pytestmark = pytest.mark.faults

WORKER = Path(__file__).parent / "workers" / "train_rc_worker.py"
STEPS, FAIL_AT = 4, 3  # a checkpoint every step: 1 and 2 are written before step 3's fails


def train(world: Path, out: Path, tmp: Path, *extra: str, check: bool):
    args = ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", "train.progress=false", "--workers", "1", "--steps", str(STEPS), "--set", "train.save_every=1",
            "--set", "train.keep_checkpoints=0", "--set", "eval.at_end=false", *extra]
    env = {"VLP_DEBUG_FAIL_SAVE_AT_STEP": str(FAIL_AT), "VLP_TEST_RC_DIR": str(tmp / "rc")}
    return run_torchrun(WORKER, 2, *args, timeout=300, check=check, env=env)


def logged_steps(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def test_disk_full_stops_every_rank_with_one_message(tiny_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(tiny_world, run, tmp_path, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    rcs = {p.name: p.read_text() for p in (tmp_path / "rc").iterdir()}
    assert rcs == {"rank_0": str(EXIT_ERROR), "rank_1": str(EXIT_ERROR)}, out[-3000:]
    errors = [line for line in out.splitlines() if "clip-train: error:" in line]
    assert len(errors) == 1, out[-3000:]
    assert "step_00000003.pt" in errors[0] and "No space left on device" in errors[0], errors[0]
    # no traceback from a rank (torchrun prints its own for the failed job)
    assert not [line for line in out.splitlines() if line.lstrip().startswith("File ") and "vlp_core" in line]
    # No partial file of step 3; steps 1 and 2 intact and loadable.
    ckpts = run / "checkpoints"
    assert not [p for p in ckpts.iterdir() if "00000003" in p.name or p.name.endswith(".tmp")]
    assert [s for s, _ in CheckpointManager(ckpts).list()] == [1, 2]
    for step, path in CheckpointManager(ckpts).list():
        assert CheckpointManager.load(path)["step"] == step
    assert logged_steps(run) == [1, 2, 3]


def test_disk_full_with_warn_trains_to_the_end(tiny_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(tiny_world, run, tmp_path, "--set", "train.on_save_error=warn", check=True)
    out = r.stdout + r.stderr
    warnings = [line for line in out.splitlines() if "train.on_save_error=warn" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], out[-3000:]
    assert "step 3" in warnings[0]
    ckpts = run / "checkpoints"
    assert [s for s, _ in CheckpointManager(ckpts).list()] == [1, 2, 4]
    assert not [p for p in ckpts.iterdir() if "00000003" in p.name or p.name.endswith(".tmp")]
    assert CheckpointManager.load(CheckpointManager(ckpts).latest())["step"] == STEPS
    assert logged_steps(run) == [1, 2, 3, 4]
    assert {p.read_text() for p in (tmp_path / "rc").iterdir()} == {"0"}
