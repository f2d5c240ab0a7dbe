"""Atomic step checkpoints and exact-resume state.

A checkpoint holds everything an uninterrupted run would still have in memory: model (with the loss
module's temperatures and method state), optimizer, scheduler, grad scaler, step, every rank's RNG states
and every rank's data position. It is written to ``<name>.tmp``, flushed and fsynced, then renamed, so a
crash never leaves a partial file under a checkpoint's name.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "atomic_save", "atomic_write"]

_NAME = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)``, fsync the file, then rename it to ``path`` (a crash leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class CheckpointManager:
    def __init__(self, folder: str | Path, *, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def list(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1][1] if found else None

    def resolve(self, resume: str) -> Path | None:
        """``latest`` -> newest checkpoint here (None if none); anything else is a path that must exist."""
        if not resume:
            return None
        if resume == "latest":
            return self.latest()
        p = Path(resume)
        if p.is_dir():
            p = CheckpointManager(p, keep=self.keep).latest() or p
        if not p.is_file():
            raise ValueError(f"checkpoint not found: {resume}")
        return p

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        atomic_save(state, path)
        if self.keep > 0:
            for _, old in self.list()[: -self.keep]:
                old.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        try:
            # Our own files: they hold numpy RNG states and the config dict, so not weights_only.
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - report which file is bad, not a pickle traceback
            raise ValueError(f"cannot read checkpoint {path}: {e}") from e
