"""Dead ranks: two ``clip-train`` ranks started as plain processes (no launcher that would stop the survivor).

One rank SIGKILLed mid-training: the other exits within ``train.dist_timeout_s`` + 30 s with one line naming
the step and the dead rank. An error found on rank 0 before a collective (a run folder that cannot be
created) stops both ranks with one message instead of leaving rank 1 waiting.
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

from vlp_core.cli import EXIT_ERROR, EXIT_PEER_LOST
from vlp_core.distributed.utils import (
    SharedError,
    any_rank,
    decide_on_main,
    is_collective_failure,
    peer_lost,
    raise_if_any,
)
from vlp_core.testing.dist import free_port

pytestmark = pytest.mark.faults

TRAIN = "from vlp_core.clip.cli import train_main; raise SystemExit(train_main())"
TIMEOUT_S = 20


def launch(tmp: Path, args: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of one job as plain processes, each leading its own process group; output to files."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        full = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
                "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port, **(env or {})}
        log = open(tmp / f"rank{rank}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, "-c", TRAIN, *args], stdout=log, stderr=subprocess.STDOUT,
                                      env=full, start_new_session=True))
        log.close()
    return procs


def kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if "train/loss" in line]


def test_survivor_of_a_killed_rank_exits_with_a_message(tiny_world: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["--preset", "smoke", "--set", f"data.world_dir={tiny_world}", "--output-dir", str(run),
            "--set", "train.progress=false", "--workers", "1", "--steps", "1000", "--set", "train.save_every=1000",
            "--set", "eval.at_end=false", "--set", f"train.dist_timeout_s={TIMEOUT_S}"]
    procs = launch(tmp_path, args, env={"VLP_DEBUG_STEP_SLEEP_S": "0.2"})
    try:
        deadline = time.monotonic() + 240
        while len(logged_steps(run)) < 2 and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.1)
        assert len(logged_steps(run)) >= 2, (tmp_path / "rank0.log").read_text()[-3000:]
        os.killpg(procs[1].pid, signal.SIGKILL)  # rank 1 and its DataLoader worker, mid-step
        killed = time.monotonic()
        rc = procs[0].wait(TIMEOUT_S + 30)
        took = time.monotonic() - killed
        # Rank 0's DataLoader worker leaves too: nothing of rank 0's process group is left behind.
        deadline = time.monotonic() + 15
        while group_alive(procs[0].pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(procs[0].pid)
    finally:
        kill_all(procs)
    out = (tmp_path / "rank0.log").read_text()
    assert rc == EXIT_PEER_LOST, out[-3000:]
    assert took < TIMEOUT_S + 30
    errors = [line for line in out.splitlines() if "clip-train: error:" in line]
    assert len(errors) == 1, out[-3000:]
    last = logged_steps(run)[-1]
    # the step it was in (or had just finished) and the dead rank, found through the rendezvous store
    assert (f"rank 0 lost contact with rank 1 during step {last + 1}:" in errors[0]
            or f"rank 0 lost contact with rank 1 after step {last}:" in errors[0]), errors[0]
    assert "Traceback" not in out


def test_an_error_on_rank_0_before_a_collective_stops_both_ranks(tiny_world: Path, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    out_dir = tmp_path / "a_file" / "run"  # rank 0 cannot create it; rank 1 never tries
    args = ["--preset", "smoke", "--set", f"data.world_dir={tiny_world}", "--output-dir", str(out_dir),
            "--set", "train.progress=false", "--set", f"train.dist_timeout_s={TIMEOUT_S}"]
    procs = launch(tmp_path, args)
    try:
        rcs = [p.wait(180) for p in procs]
    finally:
        kill_all(procs)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in (0, 1)]
    assert rcs == [EXIT_ERROR, EXIT_ERROR], logs
    # one message, from rank 0; rank 1 stops with it silently
    assert f"clip-train: error: cannot create the run folder {out_dir} (train.output_dir): Not a directory" in logs[0]
    assert "error" not in logs[1].lower() and "Traceback" not in logs[0] + logs[1], logs[1]


GLOO_RESET = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:4242: "
                          "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in "
                          "the application. Check the logs of the remote worker before reporting an error.")


def _fail(error: BaseException):
    raise error


def test_agreement_helpers_in_one_process() -> None:
    assert any_rank(True, False) == (True, False)
    assert decide_on_main(lambda: 5) == 5
    with pytest.raises(SharedError, match=r"^cannot create x$"):  # one line, whatever follows
        decide_on_main(lambda: _fail(ValueError("cannot create x\ndetails")))
    raise_if_any(None)
    with pytest.raises(SharedError, match="No space left on device"):
        raise_if_any(OSError(28, "No space left on device"))
    # gloo's errors for a dead peer are plain RuntimeErrors: told apart from a bug in the step by their text
    assert is_collective_failure(GLOO_RESET)
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    message = str(peer_lost(GLOO_RESET, "during step 7"))
    assert message.startswith("rank 0 lost contact with a peer rank during step 7: Read error [127.0.0.1]:4242: "
                              "Connection reset by peer (")
    assert "\n" not in message and "GLHF" not in message and "typically" not in message
