"""The run_torchrun test helper: failures carry the workers' output, timeouts kill the whole job."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vlp_core.testing.dist import TorchrunError, free_port, run_torchrun

pytestmark = pytest.mark.dist

WORKERS = Path(__file__).parent / "workers"


def test_failure_raises_with_worker_output() -> None:
    with pytest.raises(TorchrunError) as exc_info:
        run_torchrun(WORKERS / "fail_worker.py", 2, "--flag", "x", timeout=60)
    msg = str(exc_info.value)
    assert "DELIBERATE-FAILURE-MARKER" in msg
    assert "args=['--flag', 'x']" in msg  # extra args reach the workers
    assert "world=2" in msg
    assert exc_info.value.result is not None and exc_info.value.result.returncode != 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (killed, not yet reaped by a non-reaping init) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def test_timeout_kills_launcher_and_workers(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(TorchrunError, match="timed out"):
        run_torchrun(WORKERS / "sleep_worker.py", 1, str(pid_file), timeout=8)
    assert time.monotonic() - t0 < 30
    if pid_file.exists():  # under heavy load the launcher may not have started the worker in time
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            pytest.fail(f"worker {pid} survived the timeout")


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
