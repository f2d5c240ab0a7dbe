"""Atomic step checkpoints and exact-resume state: one file (``step_XXXXXXXX.pt``) or a DCP folder.

A checkpoint holds everything an uninterrupted run would still have in memory: model (with the loss
module's temperatures and method state), optimizer, scheduler, grad scaler, step, every rank's RNG states
and every rank's data position (an opaque, picklable value of the data pipeline).

Two formats (``train.checkpoint_format``):

- ``file``: one ``step_XXXXXXXX.pt`` written by rank 0 (full tensors), to ``<name>.tmp``, fsynced, renamed.
- ``dcp``: a folder ``step_XXXXXXXX/`` written with ``torch.distributed.checkpoint`` (see
  :mod:`vlp_core.train.dcp`): every rank writes its own shards of model and optimizer, so a resume on another
  world size reshards them. Written into ``step_XXXXXXXX.tmp/``; the completion marker ``COMPLETE`` is written
  last and the folder renamed, so only finished folders carry a checkpoint's name and are listed.

DCP stores its metadata (and the small per-rank records) as pickles, like the ``.pt`` file: both run code
when loaded, so they are read only from run folders the user names (``--resume``, ``<m>-eval RUN``).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointManager", "rng_state", "set_rng_state", "atomic_save", "atomic_write", "is_dcp_checkpoint",
           "is_trainer_checkpoint", "load_full_state", "COMPLETE"]

_NAME = re.compile(r"^step_(\d+)(\.pt)?$")
COMPLETE = "COMPLETE"  # written last into a DCP folder: its presence means the checkpoint is whole


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A finished DCP checkpoint folder (``step_<n>/`` holding the ``COMPLETE`` marker)."""
    p = Path(path)
    return p.is_dir() and bool(_NAME.match(p.name)) and not p.name.endswith(".pt") and (p / COMPLETE).is_file()


def is_trainer_checkpoint(path: str | Path) -> bool:
    """A trainer checkpoint: a ``step_<n>.pt`` file or a finished ``step_<n>/`` DCP folder."""
    p = Path(path)
    return (p.is_file() and p.suffix == ".pt" and bool(_NAME.match(p.name))) or is_dcp_checkpoint(p)


def load_full_state(path: str | Path) -> dict[str, Any]:
    """A trainer checkpoint of either format as one plain dict of full tensors, on this process (CPU).

    Keys as in the file format: ``step``, ``model`` (the ``TrainStep`` state dict: ``model.*``, ``loss.*``),
    ``optimizer`` (for a DCP folder: keyed by parameter name, as ``get_optimizer_state_dict`` gives it),
    ``scheduler``, ``scaler``, ``ranks`` (per-rank records), ``skipped``, ``config``. A DCP folder is gathered
    from every rank's shards without a process group. Pickle warning: a ``.pt`` file and DCP's metadata are
    pickles; call this only on checkpoints in run folders the user names. Raises ValueError for anything
    that is not a readable trainer checkpoint.
    """
    p = Path(path)
    if is_dcp_checkpoint(p):
        return _read_dcp_full(p)
    if p.is_dir() and _NAME.match(p.name):
        raise ValueError(f"{p} is an unfinished DCP checkpoint (no {COMPLETE} marker): the save did not complete")
    return CheckpointManager.load(p)


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
    """The checkpoints of one run folder: list, resolve, save (file or DCP, see the module docstring), load."""

    def __init__(self, folder: str | Path, *, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self._pending: tuple[Any, Path, Path, int] | None = None  # an async DCP save not yet finalised
        self._async_group: Any = None

    def list(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _NAME.match(p.name)
            if m and (p.is_file() if m.group(2) else is_dcp_checkpoint(p)):
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
        if p.is_dir() and not is_dcp_checkpoint(p):
            p = CheckpointManager(p, keep=self.keep).latest() or p
        if not is_trainer_checkpoint(p):
            raise ValueError(f"checkpoint not found: {resume} (no step_<n>.pt file or finished step_<n>/ folder)")
        return p

    def save(self, state: dict[str, Any], step: int) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step_{step:08d}.pt"
        atomic_save(state, path)
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` checkpoints (files and DCP folders; ``keep`` 0 keeps all)."""
        if self.keep > 0:
            for _, old in self.list()[: -self.keep]:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """A ``step_<n>.pt`` file, or a DCP folder gathered into the same layout (:func:`load_full_state`)."""
        if Path(path).is_dir():
            return load_full_state(path)
        try:
            # Our own files: they hold numpy RNG states and the config dict, so not weights_only.
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - report which file is bad, not a pickle traceback
            raise ValueError(f"cannot read checkpoint {path}: {e}") from e

    # -----------------------------------------------------------------------------------------------------
    # DCP folders: every rank calls these together

    def save_dcp(self, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 shared: dict[str, Any], record: dict[str, Any], *, async_save: bool = False) -> Path:
        """Write ``step_XXXXXXXX/`` with ``torch.distributed.checkpoint``; a collective call on every rank.

        ``module``/``optimizer``: the (possibly FSDP-sharded) ``TrainStep`` and its optimizer; every rank writes
        its own shards (``get_state_dict``: keys are parameter names, so any world size can read them back).
        ``shared``: the small state common to all ranks (step, scheduler, scaler, config), written by rank 0
        to ``meta.pt``; ``record``: this rank's RNG states and data position, to ``ranks/rank_XXXXX.pt``.
        With ``async_save`` the shards are written by a background thread (``dcp.async_save``, on its own gloo
        group) and the folder is finalised by the next :meth:`save_dcp` or :meth:`finish`. Returns the
        folder's final path.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish()
        rank, world = _rank_world()
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
            (tmp / "ranks").mkdir(parents=True)
        _barrier()
        atomic_save(record, tmp / "ranks" / f"rank_{rank:05d}.pt")
        if rank == 0:
            atomic_save({**shared, "world_size": world}, tmp / "meta.pt")
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if async_save:
            with _single_process_quiet():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group(),
                                        no_dist=not _distributed())
            self._pending = (future, tmp, final, world)
        else:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
            self._pending = (None, tmp, final, world)
            self.finish()
        return final

    def finish(self) -> None:
        """Finalise the pending DCP save (wait for its writes on every rank, marker, rename); else nothing."""
        if self._pending is None:
            return
        future, tmp, final, world = self._pending
        self._pending = None
        if future is not None:
            future.result()
        _barrier()  # every rank's shards and record are on disk
        if _rank_world()[0] == 0:
            atomic_write(tmp / COMPLETE, lambda f: f.write_text(json.dumps({"world_size": world}) + "\n"))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            self.prune()
        _barrier()

    def _group(self) -> Any:
        """A gloo group of all ranks for the background writes: never interleaved with the training's."""
        import torch.distributed as dist

        if self._async_group is None and _distributed():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    @staticmethod
    def load_dcp(path: str | Path, module: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Load a DCP folder into ``module`` and ``optimizer`` (resharded to this world; collective).

        Returns ``(shared, records)``: rank 0's shared state (step, scheduler, ... and ``world_size``, the
        writing world) and every writing rank's record, in rank order. Read only from run folders the user
        names (DCP metadata is a pickle).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(path)
        shared, records = _read_dcp_side(path)
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        try:
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
        except Exception as e:  # noqa: BLE001 - one line naming the folder, not DCP's per-rank traceback
            raise ValueError(f"cannot load DCP checkpoint {path}: {str(e).strip().splitlines()[-1][:500]}") from e
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return shared, records


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group, even when asked for ``no_dist``: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _read_dcp_side(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``meta.pt`` and the per-rank records of a finished DCP folder (pickles: user-named folders only)."""
    if not is_dcp_checkpoint(path):
        raise ValueError(f"{path} is not a finished DCP checkpoint folder (step_<n>/ with a {COMPLETE} marker)")
    shared = CheckpointManager.load(path / "meta.pt")
    files = sorted((path / "ranks").glob("rank_*.pt"))
    if len(files) != shared.get("world_size"):
        raise ValueError(f"{path}: {len(files)} per-rank records for a world of {shared.get('world_size')} ranks")
    return shared, [CheckpointManager.load(f) for f in files]


def _read_dcp_full(path: Path) -> dict[str, Any]:
    """Gather a DCP folder into full tensors on this process (no process group): see :func:`load_full_state`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    shared, records = _read_dcp_side(path)
    state: dict[str, Any] = {}
    try:  # the call torch.distributed.checkpoint.format_utils.dcp_to_torch_save makes, without the file
        with _single_process_quiet():
            _load_state_dict(state, storage_reader=FileSystemReader(str(path)),
                             planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read DCP checkpoint {path}: {str(e).strip().splitlines()[-1][:500]}") from e
    if "model" not in state:
        raise ValueError(f"{path} holds no 'model' state: not a vlp trainer checkpoint")
    return {**shared, "model": state["model"], "optimizer": state.get("optimizer"), "ranks": records}
