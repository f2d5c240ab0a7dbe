"""Pre-emption: SIGTERM to a whole 2-rank torchrun job writes a checkpoint at the current step, exits with the
documented codes, and ``--resume latest`` then ends bit-identical to an uninterrupted run.

Three torchrun launches: the uninterrupted reference, the signalled run, its resumption. The signal goes to
torchrun and every process under it (its workers and their DataLoader workers), as a scheduler does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import descendants, free_port, run_torchrun
from vlp_core.train.checkpoint import CheckpointManager
from vlp_core.train.loop import EXIT_PREEMPTED, STOP_SIGNALS, _Faults

pytestmark = pytest.mark.faults

WORKER = Path(__file__).parent / "workers" / "train_rc_worker.py"
STEPS, SAVE_EVERY = 4, 4  # no regular checkpoint before the signal: the one written is the stop's
TORCHRUN_SIGNALLED_EXIT = 1  # torchrun re-raises the signal as an exception once its workers are gone


def train_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", "train.progress=false", "--workers", "1", "--steps", str(STEPS),
            "--set", f"train.save_every={SAVE_EVERY}", "--set", "eval.at_end=false", "--set", "data.augment=true",
            *extra]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss" in r]


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def test_stop_signal_handler_sets_the_flag_and_restores_the_old_handlers() -> None:
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    faults = _Faults()
    faults.install()
    try:
        assert faults.signum == 0
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's early warning: recorded, the process goes on
        time.sleep(0.05)
        assert faults.signum == signal.SIGUSR1 and faults.signame == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        time.sleep(0.05)
        assert faults.signame == "SIGUSR1"
    finally:
        faults.close()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


def test_sigterm_to_the_whole_job_checkpoints_and_resumes_exactly(tiny_world: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    run_torchrun(WORKER, 2, *train_args(tiny_world, whole), timeout=300)

    run, rcs = tmp_path / "preempted", tmp_path / "rc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
           "VLP_TEST_RC_DIR": str(rcs), "VLP_DEBUG_STEP_SLEEP_S": "0.5"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER),
           *train_args(tiny_world, run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not logged_steps(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert logged_steps(run) and proc.poll() is None, "the run did not reach step 1"
        # The scheduler's SIGTERM: torchrun and every process of the job (DataLoader workers included).
        for pid in [proc.pid, *descendants(proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)  # well within torchrun's 30 s shutdown timeout per worker
    finally:
        if proc.poll() is None:
            for pid in [proc.pid, *descendants(proc.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == TORCHRUN_SIGNALLED_EXIT, out[-3000:]
    assert sorted(p.name for p in rcs.iterdir()) == ["rank_0", "rank_1"], out[-3000:]
    assert {p.read_text() for p in rcs.iterdir()} == {str(EXIT_PREEMPTED)}

    # Stopped between the regular checkpoints, with a checkpoint at the step it stopped at.
    stopped = logged_steps(run)[-1]
    assert 0 < stopped < SAVE_EVERY, out[-3000:]
    assert [s for s, _ in CheckpointManager(run / "checkpoints").list()] == [stopped]
    assert f"stopped by SIGTERM at step {stopped}" in out
    assert not list((run / "checkpoints").glob("*.tmp"))

    resumed = run_torchrun(WORKER, 2, *train_args(tiny_world, run, "--resume", "latest"), timeout=300)
    assert f"resumed from {run / 'checkpoints'}" in resumed.stderr
    a = CheckpointManager.load(CheckpointManager(whole / "checkpoints").latest())
    b = CheckpointManager.load(CheckpointManager(run / "checkpoints").latest())
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses(run) == losses(whole)  # every step's loss (rank 0's), before and after the stop
