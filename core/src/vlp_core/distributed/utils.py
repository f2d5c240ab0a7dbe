"""Process-group setup, rank queries, rank-aware logging and DDP wrapping.

Launchers supported by :func:`init_distributed`:

- ``torchrun`` / ``python -m torch.distributed.run``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT`` are read from the environment.
- SLURM ``srun`` (one task per GPU): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``. The rendezvous
  address is ``MASTER_ADDR`` if already exported, else ``SLURM_LAUNCH_NODE_IPADDR``, else the first host of
  ``SLURM_JOB_NODELIST`` (expanded with ``scontrol show hostnames``); ``MASTER_PORT`` defaults to 29500.
- Anything else: a single process, no process group; every helper here degrades to a no-op / identity.

All query helpers (:func:`get_rank`, :func:`get_world_size`, ...) are safe to call before or without
initialisation.

Faults: the process group's timeout (``init_distributed(timeout_s=)``, the trainer's ``train.dist_timeout_s``)
bounds every collective and :func:`barrier`. A collective that fails because a peer died or timed out is
turned into a one-line :class:`PeerLostError` by :func:`peer_lost` (which asks the rendezvous store which
ranks are still there). An error one rank finds before a collective reaches every rank as the same
:class:`SharedError` (:func:`raise_if_any`, :func:`decide_on_main`), so no rank waits for a peer that has left.

Tensor-name legend: none (no tensors beyond the ones passed through).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "is_main",
    "is_initialized",
    "barrier",
    "cleanup",
    "all_gather_object",
    "broadcast_object",
    "all_reduce_sum",
    "rank_zero_only",
    "RankFilter",
    "setup_logging",
    "wrap_ddp",
    "resolve_launch_env",
    "PeerLostError",
    "SharedError",
    "is_collective_failure",
    "peer_lost",
    "any_rank",
    "raise_if_any",
    "decide_on_main",
]

_LOG = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

_timeout_s = 1800.0  # the default group's collective timeout (set by init_distributed)
_control: Any = None  # a gloo group for small host-side agreements when the default group is NCCL


class PeerLostError(RuntimeError):
    """A collective failed on this rank: a peer died, left or did not answer within the process-group timeout.

    The message is one line (where, which ranks stopped answering when known, the backend's reason).
    """


class SharedError(ValueError):
    """An error one rank found, raised with the same one-line message on every rank.

    Raised by :func:`raise_if_any` / :func:`decide_on_main` so that every rank stops together instead of the
    others waiting in the next collective. ``rank`` is the rank that found it. A CLI prints it on rank 0
    only (every rank has the same message).
    """

    def __init__(self, message: str, rank: int = 0) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: Global rank (0 in a single process).
        world_size: Number of processes (1 in a single process).
        local_rank: Rank within the node; selects the CUDA device.
        device: The device this process computes on.
        backend: ``"nccl"`` / ``"gloo"``, or ``None`` when no process group was created.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use (world size > 1)."""
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str | None:
    """First host of a compressed SLURM nodelist (``node[01-04]``) via ``scontrol``; None if unavailable."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def resolve_launch_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """Work out the rendezvous variables from a launcher's environment.

    Args:
        environ: The environment to read (defaults to ``os.environ``).

    Returns:
        ``{"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}`` as strings, or ``None`` for a
        single-process run. torchrun variables win over SLURM ones (torchrun inside an allocation).
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "RANK": env["RANK"],
            "WORLD_SIZE": env["WORLD_SIZE"],
            "LOCAL_RANK": env.get("LOCAL_RANK", "0"),
            "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    # A plain `python train.py` inside an salloc shell has SLURM_NTASKS > 1 but is one process; only srun
    # sets SLURM_PROCID together with a step, so require SLURM_STEP_ID too to avoid waiting for peers forever.
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        if int(env["SLURM_NTASKS"]) <= 1:
            return None
        addr = env.get("MASTER_ADDR") or env.get("SLURM_LAUNCH_NODE_IPADDR")
        if not addr and env.get("SLURM_JOB_NODELIST"):
            addr = _first_slurm_host(env["SLURM_JOB_NODELIST"])
        if not addr:
            raise RuntimeError(
                "SLURM launch with several tasks but no rendezvous address: set MASTER_ADDR, or make "
                "SLURM_LAUNCH_NODE_IPADDR / SLURM_JOB_NODELIST (+ scontrol) available"
            )
        return {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env["SLURM_NTASKS"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "MASTER_ADDR": addr,
            "MASTER_PORT": env.get("MASTER_PORT", "29500"),
        }
    return None


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed(device='cuda') but CUDA is not available")
        # One process per GPU: local_rank selects it. Modulo guards against launching more tasks than GPUs
        # on a node only for debugging; NCCL itself rejects two ranks on one device.
        idx = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    if device == "auto":
        return torch.device("cpu")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def init_distributed(*, device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Create the default process group from the launcher's environment (or none for a single process).

    Args:
        device: ``"auto"`` (CUDA + NCCL when available, else CPU + gloo), ``"cpu"`` (forces gloo) or
            ``"cuda"``.
        timeout_s: Collective timeout of the process group (rendezvous included): a rank waiting this long
            on a peer in a collective or :func:`barrier` fails instead of hanging. gloo raises an error (then
            :func:`peer_lost`); NCCL's watchdog aborts the process.

    Returns:
        The :class:`DistInfo` of this process. Calling it again after a group exists returns the same info.
    """
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        backend = dist.get_backend()
        dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)

    launch = resolve_launch_env()
    if launch is None or int(launch["WORLD_SIZE"]) == 1:
        local_rank = int(launch["LOCAL_RANK"]) if launch else 0
        return DistInfo(0, 1, local_rank, _pick_device(device, local_rank), None)

    # env:// rendezvous reads these; exporting them also lets subprocesses / libraries see the same values.
    os.environ.update(launch)
    global _timeout_s, _control
    _timeout_s, _control = float(timeout_s), None
    rank, world_size, local_rank = int(launch["RANK"]), int(launch["WORLD_SIZE"]), int(launch["LOCAL_RANK"])
    dev = _pick_device(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev  # binds the communicator eagerly; avoids a guessed device in barrier()
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
        **kwargs,
    )
    return DistInfo(rank, world_size, local_rank, dev, backend)


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """World size, 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Rank within the node from the launcher's environment, 0 if none."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier(timeout_s: float | None = None) -> None:
    """Synchronise all ranks; no-op without a process group.

    Without ``timeout_s`` the process group's timeout applies (``init_distributed(timeout_s=)``). With it, the
    barrier is gloo's monitored barrier (on a gloo side group under NCCL): after ``timeout_s`` it raises
    :class:`PeerLostError` naming the ranks that did not arrive.
    """
    if not (is_initialized() and get_world_size() > 1):
        return
    if timeout_s is None:
        dist.barrier()
        return
    try:
        dist.monitored_barrier(group=_control_group(), timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        raise peer_lost(e, "in a barrier") from None


def cleanup(*, wait: bool = True) -> None:
    """Destroy the default process group if one exists (after a barrier unless ``wait`` is false).

    The barrier (no rank tears its gloo threads down while a peer still talks to it) waits at most the
    process group's timeout: a peer that is gone makes it fail (naming it), not hang.
    """
    global _control
    if is_initialized():
        try:
            if wait and get_world_size() > 1:
                barrier(timeout_s=_timeout_s)
        finally:
            _control = None
            dist.destroy_process_group()


def _control_group() -> Any:
    """The group for small host-side agreements: the default group under gloo, else a gloo side group.

    The side group is created on first use, a collective call: every rank must reach it in the same order.
    """
    global _control
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _control is None:
        _control = dist.new_group(backend="gloo", timeout=timedelta(seconds=_timeout_s))
    return _control


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is set on ANY rank (one small all-reduce, max, on the host); collective.

    Used at step boundaries ("a stop signal arrived", "a save failed") so that all ranks take the same branch.
    Identity in a single process.
    """
    if not (is_initialized() and get_world_size() > 1):
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group())
    return tuple(bool(v) for v in t.tolist())


def _one_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def raise_if_any(error: BaseException | None) -> None:
    """Collective: if any rank passes an error, every rank raises the same :class:`SharedError`.

    The message is the first line of the lowest failing rank's error. Call it on every rank right after the
    code that may fail on one rank only (a local file read, a check), before the next collective. Costs one
    small all-gather; nothing is raised when no rank failed.
    """
    if not (is_initialized() and get_world_size() > 1):
        if error is not None:
            raise SharedError(_one_line(error)) from error
        return
    messages = all_gather_object(None if error is None else _one_line(error))
    for rank, message in enumerate(messages):
        if message is not None:
            raise SharedError(message, rank) from error


def decide_on_main(fn: Callable[[], _T], catch: tuple[type[BaseException], ...] = (ValueError, OSError)) -> _T:
    """Run ``fn`` on rank 0 only and return its result on every rank (broadcast); collective.

    An exception of a ``catch`` type on rank 0 is raised on every rank as the same :class:`SharedError`
    (one line), so the other ranks never wait in a collective rank 0 will not reach.
    """
    result, message = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except catch as e:
            if not (is_initialized() and get_world_size() > 1):
                raise SharedError(_one_line(e)) from e
            message = _one_line(e)
    result, message = broadcast_object((result, message))
    if message is not None:
        raise SharedError(message, 0)
    return result


# Text of the errors gloo, NCCL and the store raise when a peer is gone or silent (they are plain RuntimeErrors).
_COLLECTIVE_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "connection refused", "broken pipe",
                       "timed out waiting", "processgroup", "monitoredbarrier", "failed to pass")


def is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective or store failure (a peer died or timed out), not a bug in the step."""
    if isinstance(error, PeerLostError):
        return True
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return any(m in text for m in _COLLECTIVE_MARKERS)


def _reason(error: BaseException) -> str:
    """The backend's reason in one short line (gloo prefixes a source location and appends advice)."""
    text = _one_line(error)
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0][:200]


def _silent_ranks(wait_s: float) -> list[int] | None:
    """The ranks that do not report to the rendezvous store within ``wait_s`` (after a failed collective).

    Every rank that catches a collective failure posts a key; a dead or stuck rank posts none. None when the
    store itself is unreachable (it lives in rank 0's process with env:// and torchrun's static rendezvous).
    """
    import time

    from torch.distributed.distributed_c10d import _get_default_store

    rank, world = get_rank(), get_world_size()
    try:
        store = _get_default_store()
        store.set_timeout(timedelta(seconds=wait_s))  # a store whose host died must not keep us waiting
        store.set(f"vlp/peer_lost/{rank}", "1")
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(world) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"vlp/peer_lost/{r}"])]
            if missing:
                time.sleep(0.1)
        return missing
    except Exception:  # noqa: BLE001 - the store is gone with its host: say so instead
        return None


def peer_lost(error: BaseException, where: str, *, wait_s: float = 3.0) -> PeerLostError:
    """A one-line :class:`PeerLostError` for a failed collective: ``where`` (e.g. ``"during step 7"``), the
    ranks that stopped answering when the store can tell (waits up to ``wait_s`` for the others to report),
    and the backend's reason."""
    if isinstance(error, PeerLostError):
        return error
    rank = get_rank() if is_initialized() else 0
    silent = _silent_ranks(wait_s) if is_initialized() and get_world_size() > 1 else []
    if silent is None:
        who = "rank 0 (it hosts the rendezvous store, which is unreachable)"
    elif silent:
        who = "rank " + ", ".join(str(r) for r in silent) if len(silent) < 9 else f"{len(silent)} ranks"
    else:
        who = "a peer rank"
    return PeerLostError(f"rank {rank} lost contact with {who} {where}: {_reason(error)} (a peer died, or "
                         f"did not answer within the collective timeout of {_timeout_s:.0f} s, "
                         "train.dist_timeout_s); stopping")


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank, in rank order (``[obj]`` in a single process)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks **in place**, outside autograd; returns ``t``. Identity in a single process."""
    if is_initialized() and get_world_size() > 1:
        with torch.no_grad():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def rank_zero_only(fn: _F) -> _F:
    """Decorator: run ``fn`` on global rank 0 only; other ranks get ``None`` back."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if get_rank() == 0:
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


def _current_rank() -> int:
    # Logging is often configured before the process group exists; the launcher's env already knows the rank.
    if is_initialized():
        return dist.get_rank()
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            try:
                return int(os.environ[key])
            except ValueError:
                pass
    return 0


class RankFilter(logging.Filter):
    """Lets rank 0 log everything; other ranks only at ``min_level_other`` and above, prefixed ``[rank r] ``.

    Every record gets a ``rank_prefix`` attribute ("" on rank 0) for use in format strings.

    Args:
        min_level_other: Lowest level logged on non-zero ranks.
        rank: Fixed rank (for tests); ``None`` reads it at each record, so the filter may be installed
            before :func:`init_distributed`.
    """

    def __init__(self, min_level_other: int = logging.WARNING, rank: int | None = None) -> None:
        super().__init__()
        self.min_level_other = min_level_other
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop or annotate ``record``."""
        rank = _current_rank() if self.rank is None else self.rank
        record.rank_prefix = "" if rank == 0 else f"[rank {rank}] "
        return rank == 0 or record.levelno >= self.min_level_other


def setup_logging(level: str | int = "INFO", *, other_ranks_level: str | int = "WARNING") -> None:
    """Configure the root logger: one stderr handler, rank 0 at ``level``, others at ``other_ranks_level``.

    Idempotent: a handler installed by a previous call is replaced, not duplicated.

    Args:
        level: Level for rank 0.
        other_ranks_level: Level for the other ranks (their records carry a ``[rank r]`` prefix).
    """
    lvl = logging.getLevelName(level) if isinstance(level, str) else level
    other = (
        logging.getLevelName(other_ranks_level) if isinstance(other_ranks_level, str) else other_ranks_level
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vlp_rank_handler", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._vlp_rank_handler = True  # type: ignore[attr-defined]
    handler.addFilter(RankFilter(min_level_other=max(other, lvl)))
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(rank_prefix)s%(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    # The root level must let the lower of the two through; the filter then applies the per-rank cut.
    root.setLevel(min(lvl, other))


def wrap_ddp(module: nn.Module, info: DistInfo, **kw: Any) -> nn.Module:
    """Wrap ``module`` in DDP when ``info.world_size > 1`` (``device_ids`` set on CUDA); else return it.

    Args:
        module: Module already on ``info.device``. Put learnable loss parameters (temperatures) inside it
            too, or average their gradients yourself: the distributed losses rely on the DDP gradient mean.
        info: From :func:`init_distributed`.
        **kw: Forwarded to ``DistributedDataParallel``.
    """
    if info.world_size <= 1:
        return module
    if info.device.type == "cuda":
        kw.setdefault("device_ids", [info.device.index])
        kw.setdefault("output_device", info.device.index)
    return nn.parallel.DistributedDataParallel(module, **kw)
