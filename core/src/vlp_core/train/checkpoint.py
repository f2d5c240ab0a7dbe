"""Atomic, committed step checkpoints and exact-resume state: one file (``step_XXXXXXXX.pt``) or a DCP folder.

A checkpoint holds everything an uninterrupted run would still have in memory: model (with the loss
module's temperatures and method state), optimizer, scheduler, grad scaler, step, every rank's RNG states
and every rank's data position (a plain value of the data pipeline: ints, strings, lists, dicts).

Two formats (``train.checkpoint_format``):

- ``file``: one ``step_XXXXXXXX.pt`` written by rank 0 (full tensors), to ``<name>.tmp``, fsynced, renamed;
  then its commit record ``step_XXXXXXXX.pt.commit`` (JSON: size and sha256 of the ``.pt``), written the same
  atomic way.
- ``dcp``: a folder ``step_XXXXXXXX/`` written with ``torch.distributed.checkpoint``: every rank writes its own
  shards of model and optimizer, so a resume on another world size reshards them. Written into
  ``step_XXXXXXXX.tmp/``; the commit record ``COMPLETE`` (JSON: every file's relative path and size, and the
  sha256 of the small non-shard ones: side records and DCP's metadata) is written last and the folder renamed.

Commit records: a checkpoint counts (:meth:`CheckpointManager.list`) only once its record exists, and is used
for a resume only once its files match it (:meth:`CheckpointManager.verify`): a save cut short (a kill, a
full disk) or a file truncated or damaged afterwards is detected before anything is loaded. ``--resume
latest`` (:meth:`CheckpointManager.resolve`) logs each such checkpoint and takes the previous one; pruning
(``train.keep_checkpoints``) counts only checkpoints whose files match their record, so a damaged newer one
never costs the last good one.

Safe loading: every pickle of a checkpoint (the ``.pt`` file; a DCP folder's ``meta.pt`` and
``ranks/rank_XXXXX.pt``) is read with ``torch.load(weights_only=True)`` through vlp's one safe loader,
:func:`vlp_core.convert.safe_load.load_weights_only`; everything saved here is of the types it accepts (the
numpy RNG state is stored as a tensor, see :func:`rng_state`). A pickle that needs any other object is refused
with a one-line error naming the file, and nothing of it runs. The one exception is the ``.metadata`` file of a
DCP folder, a pickle that ``torch.distributed.checkpoint`` reads itself: DCP folders are read only from run
folders the user names (``--resume``, ``<m>-eval RUN``).

Write errors (a full disk): an ``OSError`` while writing removes the partial files (``.tmp`` file or folder,
an uncommitted ``.pt``), leaves every earlier checkpoint as it was and raises :class:`CheckpointWriteError`,
one line naming the checkpoint and the OS error. For DCP every rank raises it at the same call (the ranks
agree on a gloo group; DCP gathers the shard writes' failures itself); with ``async_save`` the error of the
background write surfaces in :meth:`CheckpointManager.finish` (or, without blocking, :meth:`~CheckpointManager.poll`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
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

__all__ = ["CheckpointManager", "CheckpointWriteError", "rng_state", "set_rng_state", "atomic_save",
           "atomic_write", "is_dcp_checkpoint", "is_trainer_checkpoint", "load_full_state", "COMPLETE",
           "COMMIT_SUFFIX", "HASH_LIMIT"]

log = logging.getLogger("vlp")

_NAME = re.compile(r"^step_(\d+)(\.pt)?$")
_TMP = re.compile(r"^step_(\d+)(\.pt)?\.tmp$")  # a save in progress, or cut short
COMPLETE = "COMPLETE"  # a DCP folder's commit record, written last: its presence means the save finished
COMMIT_SUFFIX = ".commit"  # ``step_<n>.pt.commit``: the commit record of a single-file checkpoint
# A DCP folder's small files (side records, metadata; up to this size) get a sha256 in its commit record, its
# shards (``*.distcp``) their size only: hashing them on rank 0 would read the whole sharded checkpoint at each
# save and resume.
HASH_LIMIT = 64 << 20


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. a full disk); its partial files are removed, earlier ones kept.

    ``str(e)`` is one line: ``cannot write checkpoint <path> [(rank R)]: <reason>``; ``errno`` is the OS
    error's (``errno.ENOSPC`` for a full disk; None if the cause was no ``OSError``), ``path`` the
    checkpoint's final path, ``rank`` the failing rank where the save involved several.
    """

    def __init__(self, path: str | Path, cause: BaseException | str, *, rank: int | None = None) -> None:
        err = cause.errno if isinstance(cause, OSError) else None
        if isinstance(cause, OSError) and cause.strerror:
            reason = cause.strerror
        else:
            text = str(cause).strip().splitlines()
            reason = text[-1] if text else type(cause).__name__
            if isinstance(cause, BaseException) and not isinstance(cause, OSError):
                reason = f"{type(cause).__name__}: {reason}"
        where = f" (rank {rank})" if rank is not None else ""
        message = f"cannot write checkpoint {path}{where}: {reason}"
        super().__init__(err, message)
        self.path, self.rank, self.reason, self.message = Path(path), rank, reason, message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes, with its fields
        return (_rebuild_write_error, (str(self.path), self.errno, self.reason, self.rank))


def _rebuild_write_error(path: str, err: int | None, reason: str, rank: int | None) -> CheckpointWriteError:
    return CheckpointWriteError(path, OSError(err, reason) if err is not None else reason, rank=rank)


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A finished DCP checkpoint folder (``step_<n>/`` holding its ``COMPLETE`` commit record)."""
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
    from every rank's shards without a process group. Every pickle is read weights-only (see the module
    docstring). Raises ValueError (one line naming the file) for anything that is not a readable, undamaged
    trainer checkpoint or that holds objects the safe loader refuses.
    """
    p = Path(path)
    if is_dcp_checkpoint(p):
        return _read_dcp_full(p)
    if p.is_dir() and _NAME.match(p.name):
        raise ValueError(f"{p} is an unfinished DCP checkpoint (no {COMPLETE} marker): the save did not complete")
    return CheckpointManager.load(p)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and current CUDA device) RNG states, in types ``torch.load(weights_only=True)``
    accepts: numpy's key array is stored as an int64 tensor (see :func:`set_rng_state`)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (numpy's state also as the tuple ``np.random.get_state`` gives)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        numpy_state = (numpy_state["bit_generator"], keys.astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
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
    _fsync_dir(path.parent)  # make the rename itself durable


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _commit_path(path: Path) -> Path:
    return path.with_name(path.name + COMMIT_SUFFIX)


def _read_record(record: Path) -> dict[str, Any]:
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"commit record {record} is unreadable ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"commit record {record} is not a JSON object")
    return data


def _file_problem(file: Path, want: Any, name: str | None, checksums: bool) -> str | None:
    """What is wrong with ``file`` against its commit-record entry ``want`` (``{"size", "sha256"?}``), if anything.

    ``name``: the file's name inside a DCP folder (None for a single-file checkpoint, the file itself).
    """
    subject = f"{name} has" if name else "it has"
    if not isinstance(want, dict) or not isinstance(want.get("size"), int):
        return f"its commit record has no size for {name or file.name}"
    try:
        size = file.stat().st_size
    except OSError:
        return f"{name or file.name} is missing"
    if size != want["size"]:
        return f"{subject} {size} bytes, its commit record says {want['size']} (truncated or damaged)"
    if checksums and want.get("sha256") and _sha256(file) != want["sha256"]:
        return f"{name or 'it'} does not match the sha256 of its commit record (damaged)"
    return None


def _problem(p: Path, checksums: bool) -> str | None:
    """Why checkpoint ``p`` cannot be used (see :meth:`CheckpointManager.verify`), or None if it can."""
    if p.is_dir():
        record = p / COMPLETE
        if not record.is_file():
            return f"no commit record ({COMPLETE}): its save did not finish"
        try:
            data = _read_record(record)
        except ValueError as e:
            return str(e)
        files = data.get("files")
        if not isinstance(files, dict) or not files:
            return f"{COMPLETE} lists no files: not a commit record of this vlp (rewrite the checkpoint)"
        for name, want in sorted(files.items()):
            problem = _file_problem(p / name, want, name, checksums)
            if problem:
                return problem
        return None
    if not p.is_file():
        return "not found"
    record = _commit_path(p)
    if not record.is_file():
        return f"no commit record ({record.name}): its save did not finish, or the record was removed"
    try:
        return _file_problem(p, _read_record(record), None, checksums)
    except ValueError as e:
        return str(e)


class CheckpointManager:
    """The checkpoints of one run folder: list, verify, resolve, save (file or DCP), prune, load.

    See the module docstring for the formats, commit records and write errors. ``resolve``, ``verify``,
    ``list``, ``latest``, ``save`` (the file format: rank 0 only), ``prune``, ``load`` and ``poll`` are local
    (no collectives); ``save_dcp``, ``finish`` and ``load_dcp`` are called by every rank together.
    """

    def __init__(self, folder: str | Path, *, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self._pending: tuple[Any, Path, Path, int, int] | None = None  # an async DCP save not yet finalised
        self._async_group: Any = None

    # -----------------------------------------------------------------------------------------------------
    # finding, verifying and resolving checkpoints (local)

    def _entries(self) -> list[tuple[int, Path]]:
        """Every ``step_<n>.pt`` / ``step_<n>/`` here, committed or not (no ``.tmp``), by step."""
        if not self.folder.is_dir():
            return []
        found = []
        for p in self.folder.iterdir():
            m = _NAME.match(p.name)
            if m and (p.is_file() if m.group(2) else p.is_dir()):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def list(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the committed checkpoints here (commit record present; see :meth:`verify`)."""
        return [(s, p) for s, p in self._entries() if _committed(p)]

    def latest(self) -> Path | None:
        """The newest committed checkpoint (not verified: :meth:`resolve` is what a resume uses)."""
        found = self.list()
        return found[-1][1] if found else None

    @staticmethod
    def verify(path: str | Path, *, checksums: bool = True) -> None:
        """Check a checkpoint against its commit record before anything of it is loaded.

        ``checksums=False`` compares sizes only (no file is read). Raises ValueError, one line naming the
        checkpoint and the damage: no commit record (the save did not finish, or the record was removed), a
        listed file missing, a size that differs (which file), a sha256 that differs.
        """
        p = Path(path)
        problem = _problem(p, checksums)
        if problem:
            raise ValueError(f"checkpoint {p}: {problem}")

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint a resume uses: ``""`` -> None; ``latest`` -> the newest good one here; else a path.

        ``latest`` walks from the newest checkpoint: each one that fails :meth:`verify` (or an unfinished
        ``.tmp`` save newer than the one taken) is logged as a warning naming it and the reason, and the
        previous one is used. None when there is no committed checkpoint (a fresh start); ValueError when
        there are committed ones but none is usable (a restart from step 0 would silently lose them).
        A path: a checkpoint file or DCP folder, which must verify (ValueError naming the damage), or a
        run / checkpoints folder (its ``latest``, as above). Local: call it on one rank and broadcast.
        """
        if not resume:
            return None
        if resume == "latest":
            return self._newest_good()
        p = Path(resume).expanduser()
        if p.is_dir() and not _NAME.match(p.name):
            folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            found = CheckpointManager(folder, keep=self.keep)._newest_good()
            if found is None:
                raise ValueError(f"checkpoint not found: {resume} (no committed step_<n>.pt file or step_<n>/ "
                                 "folder in it)")
            return found
        if not p.exists() or not _NAME.match(p.name):
            raise ValueError(f"checkpoint not found: {resume} (no step_<n>.pt file or finished step_<n>/ folder)")
        problem = _problem(p, True)
        if problem:
            raise ValueError(f"cannot resume from {p}: {problem}")
        return p

    def _newest_good(self) -> Path | None:
        entries = self._entries()
        unfinished = []
        if self.folder.is_dir():
            unfinished = sorted((int(m.group(1)), q) for q in self.folder.iterdir() if (m := _TMP.match(q.name)))
        bad: list[str] = []
        for step, p in reversed(entries):
            problem = _problem(p, True)
            if problem:
                log.warning("skipping checkpoint %s: %s", p, problem)
                if _committed(p):
                    bad.append(f"{p.name} ({problem})")
                continue
            for _, q in unfinished:
                if int(_TMP.match(q.name).group(1)) > step:
                    log.warning("skipping %s: an unfinished save (no commit record)", q)
            return p
        if bad:
            raise ValueError(f"no usable checkpoint in {self.folder}: {len(bad)} damaged, newest {bad[0]}; move "
                             "them away to start afresh")
        return None

    # -----------------------------------------------------------------------------------------------------
    # single-file checkpoints (rank 0)

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``step_XXXXXXXX.pt`` and then its commit record; prune. Rank 0 only, no collectives.

        Raises :class:`CheckpointWriteError` (after removing the ``.tmp`` file, and the ``.pt`` if it was
        renamed but not committed); earlier checkpoints are untouched (pruning runs after a committed save).
        """
        path = self.folder / f"step_{step:08d}.pt"
        tmp, record = path.with_name(path.name + ".tmp"), _commit_path(path)
        replacing = False
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            entry = {"format": "file", "step": step, "size": tmp.stat().st_size, "sha256": _sha256(tmp)}
            # A checkpoint of the same step (written before a resume from an older one) loses its record
            # before its file is replaced: a crash in between leaves an uncommitted file, never a mix.
            replacing = True
            record.unlink(missing_ok=True)
            os.replace(tmp, path)
            _fsync_dir(self.folder)
            _write_json(record, entry)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if replacing and not record.is_file():
                path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise CheckpointWriteError(path, e) from e
            raise
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` good checkpoints (``keep`` 0 keeps all). Local, never raises.

        Walking from the newest, a checkpoint counts towards ``keep`` only if its files have the sizes of its
        commit record; everything older than the ``keep``-th good one is deleted (good, damaged, uncommitted,
        and ``.tmp`` leftovers of saves cut short). Damaged or uncommitted ones newer than it are left (a
        resumed run replaces them when it reaches their step), so they never push a good one out.
        """
        if self.keep <= 0:
            return
        good, cutoff = 0, None
        for step, p in reversed(self._entries()):
            if _problem(p, False):
                continue
            good += 1
            if good == self.keep:
                cutoff = step
                break
        if cutoff is None:
            return
        for q in list(self.folder.iterdir()):
            m = _NAME.match(q.name) or _TMP.match(q.name)
            if m and int(m.group(1)) < cutoff:
                _remove(q)
                if q.suffix == ".pt":
                    _commit_path(q).unlink(missing_ok=True)

    @staticmethod
    def load(path: str | Path) -> dict[str, Any]:
        """A ``step_<n>.pt`` file, or a DCP folder gathered into the same layout (:func:`load_full_state`).

        Read weights-only through the safe loader (ValueError naming the file for any other pickle). A file
        whose commit record is at hand is first checked against its size.
        """
        p = Path(path)
        if p.is_dir():
            return load_full_state(p)
        if _commit_path(p).is_file():
            CheckpointManager.verify(p, checksums=False)
        return _load_pickle(p)

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
        folder's final path. A write error on any rank raises :class:`CheckpointWriteError` on every rank
        (partial folder removed), here or, for the background write, in :meth:`finish` / :meth:`poll`.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.finish()
        rank, world = _rank_world()
        final = self.folder / f"step_{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        error: OSError | None = None
        if rank == 0:
            try:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
                (tmp / "ranks").mkdir(parents=True)
            except OSError as e:
                error = e
        _barrier()
        if error is None and (tmp / "ranks").is_dir():
            try:
                atomic_save(record, tmp / "ranks" / f"rank_{rank:05d}.pt")
                if rank == 0:
                    atomic_save({**shared, "world_size": world}, tmp / "meta.pt")
            except OSError as e:
                error = e
        elif error is None:
            error = FileNotFoundError(2, f"{tmp} was not created by rank 0")
        self._agree(error, tmp, final)
        model_sd, optim_sd = get_state_dict(module, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if async_save and not _distributed():  # the background thread's warning, out of the context below
            warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        try:
            with _single_process_quiet():
                if async_save:
                    future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group(),
                                            no_dist=not _distributed())
                else:
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
                    future = None
        except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001 - DCP raises on every rank
            raise self._failed(tmp, final, e) from e
        self._pending = (future, tmp, final, world, step)
        if not async_save:
            self.finish()
        return final

    @property
    def pending(self) -> bool:
        """Whether a DCP save (an ``async_save`` background write) awaits :meth:`finish`."""
        return self._pending is not None

    def poll(self) -> None:
        """Raise the error of a finished, failed background save (see :meth:`save_dcp`); else nothing.

        Non-blocking and local (no collective): a running or succeeded save is left to :meth:`finish`. On a
        failure the partial folder is removed and the pending save dropped (a later :meth:`finish` on this
        rank does nothing). A failed background write fails on every rank (DCP gathers the write results),
        but ranks may notice it at different steps: agree on a flag, then call :meth:`finish` on the ranks
        where ``poll`` did not raise yet (it waits and raises the same error).
        """
        if self._pending is None or self._pending[0] is None:
            return
        future = self._pending[0]
        if not future.done():
            return
        error = future.exception()
        if error is None:
            return
        _, tmp, final, _, _ = self._pending
        self._pending = None
        raise self._failed(tmp, final, error) from error

    def finish(self) -> None:
        """Finalise the pending DCP save (wait for its writes on every rank, commit record, rename); else nothing.

        Collective when a save is pending. Raises :class:`CheckpointWriteError` on every rank when the
        background write or the commit failed (the ``.tmp`` folder removed, earlier checkpoints kept).
        """
        if self._pending is None:
            return
        future, tmp, final, world, step = self._pending
        self._pending = None
        if future is not None:
            try:
                future.result()
            except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001 - every rank's future fails
                raise self._failed(tmp, final, e) from e
        _barrier()  # every rank's shards and record are on disk
        error: OSError | None = None
        if _rank_world()[0] == 0:
            try:
                _write_json(tmp / COMPLETE, {"format": "dcp", "step": step, "world_size": world,
                                             "files": _folder_entries(tmp)})
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            except OSError as e:
                error = e
        self._agree(error, tmp, final)  # in place of a barrier: every rank learns whether the commit failed
        if _rank_world()[0] == 0:
            self.prune()

    def _agree(self, error: OSError | None, tmp: Path, final: Path) -> None:
        """A collective: if any rank's ``error`` is set, rank 0 removes ``tmp`` and every rank raises the same error.

        Runs on the gloo group of the background writes, so it needs no device tensors whatever the
        training's backend.
        """
        failures: list[Any] = [(0, error.errno, error.strerror or str(error))] if error is not None else []
        if _distributed():
            import torch.distributed as dist

            rank, world = _rank_world()
            mine = (rank, error.errno, error.strerror or str(error)) if error is not None else None
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine, group=self._group())
            failures = [f for f in gathered if f is not None]
        if not failures:
            return
        _remove_partial(tmp)
        # A rank's ENOENT is most often a consequence (a folder another rank's failure removed): name the cause.
        rank, err, reason = min(failures, key=lambda f: (f[1] == errno.ENOENT, f[0]))
        raise CheckpointWriteError(final, OSError(err, reason) if err is not None else reason,
                                   rank=rank if _distributed() else None)

    def _failed(self, tmp: Path, final: Path, error: BaseException) -> CheckpointWriteError:
        """The partial folder of a failed DCP write removed; the error (the first failing rank's) to raise."""
        _remove_partial(tmp)
        rank, cause = None, error
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict) and failures:
            for r, wrapped in sorted(failures.items()):
                if rank is None or (isinstance(wrapped[0], OSError) and not isinstance(cause, OSError)):
                    rank, cause = r, wrapped[0]
        return CheckpointWriteError(final, cause, rank=rank if _distributed() else None)

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
        names (DCP's ``.metadata`` is a pickle; the side records are read weights-only).
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
        except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001 - one line naming the folder
            raise ValueError(f"cannot load DCP checkpoint {path}: {str(e).strip().splitlines()[-1][:500]}") from e
        set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return shared, records


def _committed(p: Path) -> bool:
    return (p / COMPLETE).is_file() if p.is_dir() else _commit_path(p).is_file()


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def _folder_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder``: relative path -> size, and sha256 for the small non-shard files."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != COMPLETE:
            size = f.stat().st_size
            entry: dict[str, Any] = {"size": size}
            if size <= HASH_LIMIT and f.suffix != ".distcp":
                entry["sha256"] = _sha256(f)
            out[f.relative_to(folder).as_posix()] = entry
    return out


def _load_pickle(path: Path) -> Any:
    """One checkpoint pickle through vlp's one safe loader (weights-only); ValueError naming the file."""
    from vlp_core.convert.safe_load import load_weights_only

    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    return load_weights_only(path)


def _checkpoint_exception() -> type[BaseException]:
    """DCP's ``CheckpointException`` (a ``BaseException``: ``except Exception`` misses it)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group, even when asked for ``no_dist``: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _remove_partial(tmp: Path) -> None:
    """Remove a failed save's ``.tmp`` folder: on rank 0 only (the folder is shared, and rank 0 creates it).

    Each rank removing it was a race: a slow rank's removal could delete the folder rank 0 had already created
    again for its next save, and that save then failed on rank 0 with "No such file or directory".
    """
    if _rank_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)


def _barrier() -> None:
    import torch.distributed as dist

    if _distributed():
        dist.barrier()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _read_dcp_side(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``meta.pt`` and the per-rank records of a finished DCP folder (weights-only), sizes checked first."""
    if not is_dcp_checkpoint(path):
        raise ValueError(f"{path} is not a finished DCP checkpoint folder (step_<n>/ with a {COMPLETE} marker)")
    CheckpointManager.verify(path, checksums=False)
    shared = _load_pickle(path / "meta.pt")
    if not isinstance(shared, dict):
        raise ValueError(f"{path / 'meta.pt'} is not a vlp checkpoint record")
    files = sorted((path / "ranks").glob("rank_*.pt"))
    if len(files) != shared.get("world_size"):
        raise ValueError(f"{path}: {len(files)} per-rank records for a world of {shared.get('world_size')} ranks")
    return shared, [_load_pickle(f) for f in files]


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
    except (Exception, _checkpoint_exception()) as e:  # noqa: BLE001
        raise ValueError(f"cannot read DCP checkpoint {path}: {str(e).strip().splitlines()[-1][:500]}") from e
    if "model" not in state:
        raise ValueError(f"{path} holds no 'model' state: not a vlp trainer checkpoint")
    return {**shared, "model": state["model"], "optimizer": state.get("optimizer"), "ranks": records}
