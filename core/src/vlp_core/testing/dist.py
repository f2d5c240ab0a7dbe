"""Run a Python worker script under ``torchrun`` (gloo, CPU) from a pytest test.

Usage::

    from vlp_core.testing.dist import run_torchrun

    def test_something(tmp_path):
        run_torchrun(WORKERS / "my_worker.py", 2, "--out", str(tmp_path / "res.json"))

The launcher is ``python -m torch.distributed.run`` with the current interpreter (the ``torchrun`` script
may not be on PATH), a free ``--master_port``, and a new process session so a timeout kills the launcher
*and* every worker. On a non-zero exit or a timeout :class:`TorchrunError` is raised carrying the combined
output of the launcher and the workers (they inherit its stdout/stderr).

Workers are responsible for choosing gloo / CPU, e.g. ``vlp_core.distributed.init_distributed(device="cpu")``;
``CUDA_VISIBLE_DEVICES`` is set to empty by default so they cannot grab a GPU by accident.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["TorchrunError", "descendants", "free_port", "run_torchrun"]

_PORT_IN_USE_MARKERS = ("address already in use", "EADDRINUSE", "errno 98")
# gloo's teardown can abort a worker under heavy CPU load (a joinable std::thread destroyed at exit); such a
# launch failed in the library, not in the code under test, so it is relaunched like a port clash.
_TEARDOWN_ABORT_MARKERS = ("terminate called without an active exception",)


class TorchrunError(AssertionError):
    """A torchrun job failed or timed out. ``result`` holds returncode/stdout/stderr (None on timeout)."""

    def __init__(self, message: str, result: subprocess.CompletedProcess[str] | None = None) -> None:
        super().__init__(message)
        self.result = result


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (races are handled by :func:`run_torchrun`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(text: str | None, limit: int = 12_000) -> str:
    text = text or ""
    return text if len(text) <= limit else "...[truncated]...\n" + text[-limit:]


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_job(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the launcher and every process under it.

    The launcher leads its own session, but torchrun starts each worker in a *new* session too, so killing
    the launcher's process group alone would orphan the workers (and keep our pipes open). Collect the
    tree first: once the launcher dies its children are re-parented and can no longer be found from it.
    """
    pids = descendants(proc.pid)
    for pid in [proc.pid, *pids]:
        for kill in (os.killpg, os.kill):  # the worker's own group (its helpers), then the pid itself
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, signal.SIGKILL)


def run_torchrun(
    script: str | Path,
    nproc: int,
    *args: str,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    check: bool = True,
    retries_on_port_clash: int = 2,
) -> subprocess.CompletedProcess[str]:
    """Launch ``script`` with ``nproc`` local workers and wait for it.

    Args:
        script: Path of the worker script.
        nproc: ``--nproc_per_node``.
        *args: Arguments passed to every worker.
        timeout: Seconds before the whole job (launcher and workers) is killed and :class:`TorchrunError`
            raised.
        env: Extra environment variables (added to a copy of ``os.environ``; override the defaults below).
        cwd: Working directory (defaults to the current one).
        check: Raise :class:`TorchrunError` on a non-zero exit (else return the result as is).
        retries_on_port_clash: Relaunches with a new port when the chosen one was taken meanwhile.

    Returns:
        The completed process; ``stdout``/``stderr`` hold the launcher's and the workers' output.
    """
    full_env = dict(os.environ)
    # One thread per worker: the tests share a few cores; empty CUDA_VISIBLE_DEVICES keeps workers on CPU.
    full_env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)  # a test process launched under torchrun must not leak its own rendezvous
    if env:
        full_env.update(env)

    for attempt in range(retries_on_port_clash + 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(script),
            *args,
        ]
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_job(proc)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a stray process still holds the pipes: give up on output
                out, err = "", "(output unavailable: pipes still held open after the kill)"
            raise TorchrunError(
                f"torchrun job timed out after {timeout:.0f} s: {' '.join(cmd)}\n"
                f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}"
            ) from None
        finally:
            if proc.poll() is None:  # e.g. KeyboardInterrupt in communicate(): do not leave workers behind
                _kill_job(proc)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        combined = (out + err).lower()
        clash = result.returncode != 0 and any(
            m.lower() in combined for m in _PORT_IN_USE_MARKERS + _TEARDOWN_ABORT_MARKERS
        )
        if clash and attempt < retries_on_port_clash:
            continue
        if check and result.returncode != 0:
            raise TorchrunError(
                f"torchrun job failed with exit code {result.returncode}: {' '.join(cmd)}\n"
                f"--- stdout ---\n{_tail(out)}\n--- stderr ---\n{_tail(err)}",
                result,
            )
        return result
    raise AssertionError("unreachable")  # pragma: no cover
