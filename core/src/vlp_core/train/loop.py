"""The step-based trainer: ``run(cfg, method)`` is all a method's CLI calls.

One step = each rank's share of the global batch, read as one batch and, with ``accum_steps`` > 1, split into
that many chunks: for a method with ``exact_accumulation`` the step's gradient is the whole batch's
(:mod:`vlp_core.train.accumulate`), otherwise the loss is cut per chunk. The loop reads host values only at
log steps; the NaN/Inf guard skips a non-finite step on the device where the
fused optimizer allows it.

Faults (see :class:`_Faults`): SIGTERM or SIGUSR1 sets a flag; at the next step boundary every rank agrees
(one small all-reduce), writes a checkpoint at that step and exits with :data:`EXIT_PREEMPTED`. A failed
checkpoint write (disk full...) stops every rank with one message, or with ``train.on_save_error=warn`` is
logged and training goes on. A collective that fails because a peer died or timed out
(``train.dist_timeout_s``) becomes one :class:`~vlp_core.distributed.utils.PeerLostError` naming the step.

Parallelism (``train.parallel``: DDP, FSDP2 or HSDP) is applied by :mod:`vlp_core.train.parallel` before the
optimizer is built; checkpoints (``train.checkpoint_format``: one file, or a DCP folder every rank writes and
any world size reads back) by :mod:`vlp_core.train.checkpoint`. Resume is exact on the writing world size; on
another (DCP only) it continues at the same step and global sample count (see ``_restore``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp_core.config import RunConfig, dump_yaml, to_dict
from vlp_core.data.skips import SkipLog, sum_counts
from vlp_core.data.transforms import prepare_images
from vlp_core.data.wds import BatchMeta, WdsPipeline, build_train_loader, parse_sources
from vlp_core.distributed import DistInfo, all_gather_object, barrier, init_distributed, is_main
from vlp_core.distributed.utils import (
    SharedError,
    any_rank,
    decide_on_main,
    is_collective_failure,
    peer_lost,
    raise_if_any,
)
from vlp_core.logging.writer import RunWriter, caption_grid
from vlp_core.method import MethodSpec
from vlp_core.train.accumulate import accumulate_exact, merge_features, split_batch
from vlp_core.train.checkpoint import CheckpointManager, is_dcp_checkpoint, rng_state, set_rng_state
from vlp_core.train.optim import build_optimizer, build_scheduler
from vlp_core.train.parallel import (
    apply_parallel,
    full_norm,
    is_sharded,
    set_gradient_sync,
    split_scalar_groups,
    sync_replicated_grads,
)
from vlp_core.train.resume_check import check_resume
from vlp_core.train.setup import build_parts, evaluate, resolve_output_dir, resolve_world

__all__ = ["run", "TrainStep", "Preempted", "EXIT_PREEMPTED", "STOP_SIGNALS"]

log = logging.getLogger("vlp")

# The exit status of a worker that stopped on a signal after writing its checkpoint: sysexits.h's EX_TEMPFAIL
# ("temporary failure, retry"). torchrun itself exits 1 in that case (see the README's "Faults and recovery").
EXIT_PREEMPTED = 75
# SLURM sends SIGUSR1 ahead of the end of a job with --signal=USR1@<s>; schedulers send SIGTERM when pre-empting.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked, its checkpoint is written
    """The run stopped on a stop signal after writing a checkpoint at ``step`` (``path``; None where unknown)."""

    def __init__(self, signame: str, step: int, path: Path | None) -> None:
        super().__init__(f"stopped by {signame} at step {step}")
        self.signame, self.step, self.path = signame, step, path


class _Faults:
    """A run's fault state: the stop signal caught, where the loop is (for messages), the data loader.

    :meth:`install` sets handlers for :data:`STOP_SIGNALS` that only record the signal (the loop acts on it
    at the next step boundary, on every rank at once); :meth:`close` restores the previous handlers and shuts
    the data loader's workers down, also after an error.
    """

    def __init__(self) -> None:
        self.signum = 0
        self.step = 0  # the step being computed (during) or the last one finished (after)
        self.during = False
        self.loader: Any = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (an embedding application): no handlers, no pre-emption
            self.close()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop signal"

    def where(self) -> str:
        if self.step == 0 and not self.during:
            return "before the first step"
        return f"during step {self.step}" if self.during else f"after step {self.step}"

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        shutdown = getattr(self.loader, "_shutdown_workers", None)  # a multi-process DataLoader iterator
        self.loader = None
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()


def _data_worker_init(inner: Callable[[int], None] | None, worker_id: int) -> None:
    """In each DataLoader worker: ignore the stop signals (a scheduler signals every process of the job).

    The trainer handles them; a data worker killed by one would make the trainer fail before it could save.
    The workers still exit with the trainer: it shuts them down, and they watch for its death.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if inner is not None:
        inner(worker_id)


class TrainStep(nn.Module):
    """Model and loss as one module, so DDP syncs the loss's learnable temperature and bias too.

    ``forward(batch)`` is the loss of ``batch``. For exact accumulation (:mod:`vlp_core.train.accumulate`)
    it also gives a chunk's features alone (``features_only``), or the loss of the whole ``full_batch`` from
    the ``cached`` features of its chunks with chunk ``index``'s recomputed with gradient.
    """

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, Any], *, features_only: bool = False, cached: list | None = None,
                index: int = 0, full_batch: dict[str, Any] | None = None) -> Any:
        features = self.model(batch)
        if features_only:
            return features
        if cached is not None:
            features = merge_features([*cached[:index], features, *cached[index + 1:]])
            batch = full_batch if full_batch is not None else batch
        return self.loss(features, batch)


@dataclass
class _State:
    step: int = 0
    data: dict[int, int] = field(default_factory=dict)  # logical worker -> raw samples consumed
    skipped: dict[str, int] = field(default_factory=dict)  # this rank's own skip totals, by reason
    skips: SkipLog = field(default_factory=SkipLog)  # the global totals (at log steps) and the examples to log
    batches: int = 0  # rank batches (whole steps' worth, all accumulation chunks) consumed on this rank
    base: int = 0  # samples this rank took over when resuming on another world size (see ``_restore``)


def _autocast(cfg: RunConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, str]:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision


def _to_device(batch: dict[str, Any], device: torch.device, *, mean: list[float] | tuple[float, ...] | None = None,
               std: list[float] | tuple[float, ...] | None = None) -> dict[str, Any]:
    """Tensors to ``device``; uint8 image batches normalised there with ``mean``/``std`` ([0, 1] units,
    ``model.vision.image_mean``/``image_std``; CLIP's statistics when not given)."""
    stats = {} if mean is None or std is None else {"mean": mean, "std": std}
    out = {}
    for k, v in batch.items():
        if k == "images" or (isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.ndim == 4):
            out[k] = prepare_images(v, device, **stats)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        else:
            out[k] = v
    return out


def _record(state: _State, rank_batch: int) -> dict[str, Any]:
    """This rank's part of a checkpoint: RNG states, data position (opaque per consumer), batches, samples."""
    return {"rng": rng_state(), "data": dict(state.data), "batches": state.batches,
            "samples": state.base + state.batches * rank_batch, "skipped": dict(state.skipped)}


def _shared(state: _State, scheduler, scaler, cfg: RunConfig) -> dict[str, Any]:
    return {"step": state.step, "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "skipped": dict(state.skipped),
            "config": to_dict(cfg)}


def _save(ckpt: CheckpointManager, fmt: str, state: _State, step_module: nn.Module, optimizer, scheduler, scaler,
          cfg: RunConfig, rank_batch: int) -> None:
    """One checkpoint: a DCP folder every rank writes, or one file rank 0 writes with every rank's record."""
    shared = _shared(state, scheduler, scaler, cfg)
    if state.step == int(os.environ.get("VLP_DEBUG_FAIL_SAVE_AT_STEP", "0")):  # test hook: a full disk
        shared["debug_disk_full"] = _DiskFull()
    if fmt == "dcp":
        ckpt.save_dcp(state.step, step_module, optimizer, shared, _record(state, rank_batch),
                      async_save=cfg.train.async_save)
        return
    per_rank = all_gather_object(_record(state, rank_batch))
    if is_main():
        ckpt.save({**shared, "model": step_module.state_dict(), "optimizer": optimizer.state_dict(),
                   "ranks": per_rank}, state.step)


class _DiskFull:
    """Test-only (``VLP_DEBUG_FAIL_SAVE_AT_STEP``): pickling it raises ENOSPC, so the checkpoint writer fails
    midway through writing its file, as on a full disk, and its own cleanup runs."""

    def __reduce__(self) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _attempt(fn: Callable[[], Any]) -> OSError | None:
    """``fn()``; the OSError it raises (a failed checkpoint write: CheckpointWriteError is one), else None."""
    try:
        fn()
    except OSError as e:
        return e
    return None


def _save_failed(ckpt: CheckpointManager, error: OSError | None, cfg: RunConfig, step: int, *,
                 stopping: bool = False) -> None:
    """After a failed checkpoint write on some rank (all ranks call this together): stop every rank with the
    same one-line error (``train.on_save_error=stop``, or when ``stopping`` on a signal), else warn.

    A rank whose own write did not fail but which has a background (async) save pending waits for it: it
    failed too, with the same error. The message is the first failing rank's (one small all-gather).
    """
    if error is None and ckpt.pending:
        error = _attempt(ckpt.finish)
    messages = [m for m in all_gather_object(None if error is None else str(error).strip().splitlines()[0]) if m]
    message = messages[0] if messages else "a checkpoint write failed on another rank"
    if stopping:
        raise SharedError(f"{message}; the checkpoint at step {step} (before stopping) was not written: the run "
                          "resumes from the previous one") from error
    if cfg.train.on_save_error == "stop":
        raise SharedError(f"{message}; stopping at step {step} (train.on_save_error=stop; the earlier checkpoints "
                          "are intact; with train.on_save_error=warn training goes on)") from error
    if is_main():
        log.warning("%s; training goes on without the checkpoint of step %d (train.on_save_error=warn)",
                    message, step)


def _boundary(faults: _Faults, ckpt: CheckpointManager, cfg: RunConfig, step: int, save: Callable[[], None],
              saving: bool) -> None:
    """The end of a step on every rank: write the checkpoint due (or check a background save), then agree (one
    all-reduce) on a stop signal and on a failed write; act on them (see :func:`_save_failed`).

    On a stop signal the checkpoint of this step is written (unless it just was), any background save finished,
    and :class:`Preempted` raised on every rank.
    """
    error = _attempt(save if saving else ckpt.poll)
    stop, failed = any_rank(faults.signum != 0, error is not None)
    if failed:
        _save_failed(ckpt, error, cfg, step, stopping=stop)
    if not stop:
        return
    if is_main():
        log.warning("%s received: stopping after the checkpoint of step %d", faults.signame, step)
    error = None if saving else _attempt(save)  # (a failed save has raised above)
    error = error or _attempt(ckpt.finish)
    if any_rank(error is not None)[0]:
        _save_failed(ckpt, error, cfg, step, stopping=True)
    path = ckpt.latest() if is_main() else None
    if is_main():
        log.warning("stopped by %s at step %d: checkpoint %s written; exiting with code %d (continue the run "
                    "with --resume latest)", faults.signame, step, path, EXIT_PREEMPTED)
    raise Preempted(faults.signame, step, path)


def _restore(path: Path, shared: dict[str, Any], records: list[dict[str, Any]], info: DistInfo, cfg: RunConfig,
             workers: int, rank_batch: int) -> _State:
    """The loop state after ``path``: exact with the writing world size; else the same global sample count.

    The RNG states are not set here (:func:`_restore_rng`, once the data loader has drawn its seed).
    Same world size: this rank's RNG states and every consumer's data position, so the run continues
    bit-identically. Another world size (a DCP checkpoint; model and optimizer were resharded): the consumer
    layout of the data stream differs, so each new consumer starts its stream skipping an equal share of the
    samples consumed so far (``global samples // consumers`` raw samples, an int position), and every rank
    reseeds its RNGs from ``train.seed``, its rank and the step. The step, schedule and global sample count
    continue; which samples come next is not what the old world would have read.
    """
    step = int(shared["step"])
    # Each rank's own skip totals are in its record (their sum: the run's); an older checkpoint has rank 0's only.
    if all("skipped" in r for r in records):
        own = [dict(r["skipped"]) for r in records]
    else:
        own = [dict(shared.get("skipped", {})), *({} for _ in records[1:])]
    skips = SkipLog(sum_counts(own))
    if len(records) == info.world_size:
        mine = records[info.rank]
        base = int(mine["samples"]) - mine["batches"] * rank_batch if "samples" in mine else 0
        return _State(step=step, data={int(k): v for k, v in mine["data"].items()}, skipped=own[info.rank],
                      skips=skips, batches=mine["batches"], base=base)
    if not is_dcp_checkpoint(path):
        raise ValueError(f"checkpoint {path} was written by {len(records)} ranks; this run has {info.world_size}: "
                         "a single-file checkpoint resumes on the same world size only (train.checkpoint_format=dcp "
                         "reshards)")
    total = sum(int(r["samples"]) for r in records)
    share = total // (info.world_size * workers)
    log.warning("resuming %s (written by %d ranks) on %d ranks: model and optimizer resharded; the data stream "
                "restarts with each of the %d consumers skipping %d samples (same global sample count, %d), "
                "RNGs reseeded", path, len(records), info.world_size, info.world_size * workers, share, total)
    base = total // info.world_size + (info.rank < total % info.world_size)  # the ranks' bases add up to total
    skipped = sum_counts(own) if info.rank == 0 else {}  # the totals stay whole: rank 0 carries the old ranks'
    return _State(step=step, data=dict.fromkeys(range(workers), share), skipped=skipped, skips=skips, batches=0,
                  base=base)


def _restore_rng(records: list[dict[str, Any]] | None, info: DistInfo, cfg: RunConfig, step: int) -> None:
    """This rank's saved RNG states (same world size), else a reseed from ``train.seed``, rank and step."""
    if records is None:
        return
    if len(records) == info.world_size:
        set_rng_state(records[info.rank]["rng"])
    else:
        torch.manual_seed(cfg.train.seed + info.rank + 1_000_003 * step)


def _checkpoint_format(t) -> str:
    fmt = t.checkpoint_format
    if fmt == "auto":
        fmt = "dcp" if t.parallel in ("fsdp", "hsdp") else "file"
    if fmt == "file" and t.parallel != "ddp":
        raise ValueError(f"train.checkpoint_format=file needs train.parallel=ddp (got {t.parallel}): sharded runs "
                         "write DCP folders (train.checkpoint_format=dcp)")
    if t.async_save and fmt != "dcp":
        raise ValueError("train.async_save needs train.checkpoint_format=dcp")
    if t.parallel != "ddp" and t.precision == "fp16":
        raise ValueError(f"train.precision=fp16 (a grad scaler) is not supported with train.parallel={t.parallel}: "
                         "use bf16 or fp32")
    return fmt


def run(cfg: RunConfig, method: MethodSpec) -> dict[str, float]:
    """Train ``method`` with ``cfg``; returns the final evaluation metrics (empty if evaluation is off)."""
    cfg.validate()
    info = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    torch.manual_seed(cfg.train.seed + info.rank)
    out_dir = resolve_output_dir(cfg)
    world = resolve_world(cfg, info)
    parts = build_parts(cfg, method, world=world, device=info.device)
    writer = RunWriter(out_dir, enabled=is_main())
    if is_main():
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        log.info("run folder: %s", out_dir)
    faults = _Faults()
    faults.install()
    try:
        return _train(cfg, method, info, parts, writer, out_dir, faults)
    except RuntimeError as e:
        if info.distributed and is_collective_failure(e):
            raise peer_lost(e, faults.where()) from None  # one line: which step, which rank, why
        raise
    finally:
        faults.close()
        writer.close()


def _resolve_resume(ckpt: CheckpointManager, resume: str) -> Path | None:
    """``train.resume`` to a checkpoint path (rank 0 only: :func:`_train` broadcasts it)."""
    path = ckpt.resolve(resume)
    if path is None and resume and resume != "latest":
        raise ValueError(f"checkpoint not found: {resume}")
    return path


def _train(cfg: RunConfig, method: MethodSpec, info: DistInfo, parts: Any, writer: RunWriter,
           out_dir: Path, faults: _Faults) -> dict[str, float]:
    t = cfg.train
    device = info.device
    micro = t.batch_size // (info.world_size * t.accum_steps)
    if micro * info.world_size * t.accum_steps != t.batch_size or micro == 0:
        raise ValueError(f"train.batch_size {t.batch_size} must be divisible by world size {info.world_size} "
                         f"x accum_steps {t.accum_steps}")
    # The loader yields each rank's whole step batch; accumulation splits it into accum_steps chunks, so the
    # samples of a global batch do not depend on accum_steps.
    rank_batch = micro * t.accum_steps
    exact = t.accum_steps > 1 and method.exact_accumulation
    step_module = TrainStep(parts.model, parts.loss).to(device)
    if t.grad_checkpointing and hasattr(parts.model, "set_grad_checkpointing"):
        parts.model.set_grad_checkpointing(True)
    fmt = _checkpoint_format(t)
    autocast, precision = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ckpt = CheckpointManager(out_dir / "checkpoints", keep=t.keep_checkpoints)
    # Rank 0 resolves --resume (skipping damaged checkpoints) and every rank uses its answer, or its error.
    path = decide_on_main(lambda: _resolve_resume(ckpt, t.resume))
    saved = None
    if path is not None and not is_dcp_checkpoint(path):
        if t.parallel != "ddp":
            raise ValueError(f"{path} is a single-file checkpoint: resume it with train.parallel=ddp "
                             "(sharded runs resume from DCP folders)")
        saved, error = None, None
        try:  # every rank reads the file: one that cannot (another filesystem view) stops them all
            saved = ckpt.load(path)
        except (ValueError, OSError) as e:
            error = e
        raise_if_any(error)
        step_module.load_state_dict(saved["model"])  # full tensors, before any wrapping
    if t.init_from and path is None:
        from vlp_core.train.init_from import init_from

        init_from(step_module, t.init_from, cfg)
    elif t.init_from:
        log.info("resuming %s: train.init_from (%s) is not applied again", path, t.init_from)
    # Wrap (DDP, or shard in place with FSDP2), then build the optimizer on the resulting parameters.
    model_for_train = apply_parallel(step_module, info, parallel=t.parallel, compile=t.compile,
                                     hsdp_replicate=t.hsdp_replicate, bf16_params=precision == "bf16")
    optimizer = build_optimizer(step_module, cfg.optim, device=device)
    split_scalar_groups(optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=t.steps)
    sharded = is_sharded(step_module)
    if sharded and method.visualize is not None and is_main():
        log.info("train.parallel=%s: the method's TensorBoard images are not drawn (sharded model)", t.parallel)
    workers = max(cfg.data.workers, 1)
    state, records = _State(), None
    if path is not None:
        if saved is not None:
            try:
                optimizer.load_state_dict(saved["optimizer"])
            except ValueError as e:  # e.g. a file from before the scalars had param groups of their own
                raise ValueError(f"cannot load the optimizer state of {path}: {e}") from None
            shared, records = saved, saved["ranks"]
        else:
            shared, records = ckpt.load_dcp(path, step_module, optimizer)
        scheduler.load_state_dict(shared["scheduler"])
        if scaler is not None and shared.get("scaler"):
            scaler.load_state_dict(shared["scaler"])
        state = _restore(path, shared, records, info, cfg, workers, rank_batch)
        check_resume(path, shared, records, state, cfg, info, workers, rank_batch)  # changed data settings
        log.info("resumed from %s at step %d", path, state.step)

    pipeline = WdsPipeline(
        parse_sources(parts.train_data, cfg.data.train_weights), parts.adapter, batch_size=rank_batch,
        seed=cfg.data.seed, rank=info.rank, world_size=info.world_size, resampled=cfg.data.resampled,
        shuffle_buffer=cfg.data.shuffle_buffer, start=state.data,
        worker_offset=state.batches % workers if cfg.data.workers > 0 else 0, seed_samples=True,
        max_image_pixels=cfg.data.max_image_pixels, max_shard_failures=cfg.data.max_shard_failures)
    data_loader = build_train_loader(pipeline, workers=cfg.data.workers, pin_memory=device.type == "cuda")
    if data_loader.num_workers > 0:  # before the workers fork
        data_loader.worker_init_fn = functools.partial(_data_worker_init, data_loader.worker_init_fn)
    loader = faults.loader = iter(data_loader)
    # After the loader's iterator has drawn its base seed from the torch RNG, as the uninterrupted run's did
    # before its first step: the resumed RNG stream then continues exactly where the checkpoint left it.
    _restore_rng(records, info, cfg, state.step)

    kill_at = int(os.environ.get("VLP_DEBUG_KILL_AT_STEP", "0"))
    step_sleep = float(os.environ.get("VLP_DEBUG_STEP_SLEEP_S", "0"))  # test hook: slow steps to signal between
    progress = None
    if is_main() and t.progress:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=state.step, desc=f"{method.name}-train", dynamic_ncols=True)
    window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
    nonfinite = torch.zeros((), device=device)
    last_parts: dict[str, torch.Tensor] = {}
    model_for_train.train()
    while state.step < t.steps:
        faults.step, faults.during = state.step + 1, True
        if step_sleep:
            time.sleep(step_sleep)
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        batch, meta = next(loader)
        wait_time += time.perf_counter() - t0
        _account(state, meta)
        if is_main() and t.image_grid_every and state.step % t.image_grid_every == 0:
            _log_grid(writer, state.step, batch)
        batch = _to_device(batch, device, mean=cfg.model.vision.image_mean, std=cfg.model.vision.image_std)
        if (method.visualize is not None and is_main() and t.image_grid_every and not sharded
                and state.step % t.image_grid_every == 0):
            _log_method_images(writer, state.step, method, step_module, batch)

        def backward(loss: torch.Tensor) -> None:
            (scaler.scale(loss) if scaler is not None else loss).backward()

        def sync(last: bool) -> contextlib.AbstractContextManager:
            set_gradient_sync(step_module, last)  # FSDP2: reduce-scatter on the last chunk only
            if last or not hasattr(model_for_train, "no_sync"):
                return contextlib.nullcontext()
            return model_for_train.no_sync()

        chunks = split_batch(batch, t.accum_steps) if t.accum_steps > 1 else [batch]
        if exact:
            out = accumulate_exact(step_module, model_for_train, chunks, batch, backward=backward, sync=sync,
                                   autocast=autocast, device=device)
        else:  # one chunk, or a method whose loss is cut per chunk (MethodSpec.exact_accumulation False)
            for m, chunk in enumerate(chunks):
                with sync(m == len(chunks) - 1), autocast:
                    out = model_for_train(chunk)
                backward(out.loss / len(chunks))
        last_parts = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.parts.items()}}
        skipped = _optimizer_step(step_module, optimizer, scaler, t.grad_clip, nonfinite, last_parts)
        after_step = getattr(step_module.loss, "after_step", None)
        if after_step is not None:  # method state, once per step on the whole batch; not after a skipped step
            after_step(~skipped)
        scheduler.step()
        state.step += 1
        window_steps += 1
        if progress is not None:
            progress.update(1)
        if state.step % t.log_every == 0 or state.step == t.steps:
            elapsed = time.perf_counter() - window_start
            _log_step(writer, state, last_parts, optimizer, nonfinite, t, elapsed, wait_time, window_steps,
                      progress)
            window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
        faults.during = False
        _boundary(faults, ckpt, cfg, state.step,
                  lambda: _save(ckpt, fmt, state, step_module, optimizer, scheduler, scaler, cfg, rank_batch),
                  saving=state.step % t.save_every == 0 or state.step == t.steps)
        if kill_at and state.step == kill_at:  # test hook: die like a pre-empted job
            ckpt.finish()  # an async save is complete
            barrier()  # rank 0 has finished writing the checkpoint before any rank dies
            os.kill(os.getpid(), signal.SIGKILL)
        if t.eval_every and state.step % t.eval_every == 0 and state.step != t.steps:
            evaluate(cfg, method, parts, _eval_view(step_module, cfg, method, parts, device), writer, state.step,
                     device)
            model_for_train.train()
    error = _attempt(ckpt.finish)  # the last async save
    stop, failed = any_rank(faults.signum != 0, error is not None)
    if failed:
        _save_failed(ckpt, error, cfg, state.step)
    if stop:  # after the last step's checkpoint: the final evaluation is left to the resumed run
        path = ckpt.latest() if is_main() else None
        if is_main():
            log.warning("stopped by %s after the last step (%d; checkpoint %s); exiting with code %d before the "
                        "final evaluation (--resume latest runs it)", faults.signame, state.step, path,
                        EXIT_PREEMPTED)
        raise Preempted(faults.signame, state.step, path)
    if progress is not None:
        progress.close()
    results: dict[str, float] = {}
    if cfg.eval.at_end:
        results = evaluate(cfg, method, parts, _eval_view(step_module, cfg, method, parts, device), writer,
                           state.step, device)
    if is_main() and state.skips.totals:  # every rank's, as of the last log step (the last step is one)
        log.info("skipped samples: %s", state.skips.totals)
    return results


def _eval_view(step_module: TrainStep, cfg: RunConfig, method: MethodSpec, parts: Any,
               device: torch.device) -> nn.Module:
    """The module to evaluate: ``step_module`` itself, or under FSDP a full, unsharded copy on every rank.

    Evaluation calls the towers' own methods (``encode_image``...), not the sharded forward, and each rank
    evaluates a different number of batches, so it cannot run on the shards: the parameters are gathered
    (``get_model_state_dict(full_state_dict=True)``, a collective) into a freshly built model. This costs one
    full copy of the model per rank while evaluating.
    """
    if not is_sharded(step_module):
        return step_module
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(step_module, options=StateDictOptions(full_state_dict=True))
    saved = rng_state()  # building draws random inits: keep the training's RNG stream as it was
    view = TrainStep(method.build_model(cfg, parts.tokenizer), method.build_loss(cfg)).to(device)
    set_rng_state(saved)
    view.load_state_dict(full)
    return view


def _account(state: _State, meta: BatchMeta) -> None:
    state.data[meta.worker] = meta.raw
    state.batches += 1
    for reason, n in meta.skipped.items():
        state.skipped[reason] = state.skipped.get(reason, 0) + n
    state.skips.note(meta.examples)  # logged, a few per reason, by rank 0 at the next log step


def _optimizer_step(module: nn.Module, optimizer, scaler, grad_clip: float, nonfinite: torch.Tensor,
                    parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Clip, then step unless the gradient or loss is non-finite; returns that flag (a device tensor)."""
    sync_replicated_grads(module)  # FSDP: the scalars it leaves replicated (no-op otherwise)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in module.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = full_norm(params, max_norm)  # the global norm, DTensor (FSDP) gradients included
    parts["grad_norm"] = norm.detach()
    bad = (~torch.isfinite(norm)) | (~torch.isfinite(parts["loss"]))
    if scaler is not None:  # the scaler already skips non-finite steps (early ones are normal: no counting)
        scaler.step(optimizer)
        scaler.update()
        return bad
    if getattr(optimizer, "defaults", {}).get("fused"):
        # The fused AdamW reads ``found_inf`` on the device and skips the update: no host sync.
        optimizer.found_inf = bad.float()
        optimizer.step()
        optimizer.found_inf = None
    elif not bool(bad):  # CPU path: a host read here is free
        optimizer.step()
    nonfinite.mul_(bad.float()).add_(bad.float())  # consecutive non-finite steps
    return bad


def _log_step(writer: RunWriter, state: _State, parts: dict[str, torch.Tensor], optimizer, nonfinite,
              t, elapsed: float, wait: float, steps: int, progress) -> None:
    values = {f"train/{k}": float(v) for k, v in parts.items()}
    values["train/lr"] = optimizer.param_groups[0]["lr"]
    values["train/samples_per_s"] = steps * t.batch_size / max(elapsed, 1e-9)
    values["train/data_wait_frac"] = wait / max(elapsed, 1e-9)
    # One all-reduce of the skip counts on every rank (log steps are the same on all), one line on rank 0.
    for reason, n in state.skips.update(state.step, state.skipped).items():
        values[f"data/skipped_{reason}"] = n
    writer.scalars(state.step, values)
    if progress is not None:
        progress.set_postfix(loss=f"{values['train/loss']:.3f}", sps=f"{values['train/samples_per_s']:.0f}")
    if float(nonfinite) > t.nan_guard:
        raise FloatingPointError(
            f"{int(nonfinite)} consecutive steps had a non-finite loss or gradient (last at step {state.step}); "
            "lower optim.lr, raise optim.warmup_steps or use train.precision=fp32")


def _log_grid(writer: RunWriter, step: int, batch: dict[str, Any]) -> None:
    images, captions = batch.get("images"), batch.get("texts")
    if isinstance(images, torch.Tensor) and isinstance(captions, list):
        writer.image(step, "train/samples", caption_grid(images, captions))


def _log_method_images(writer: RunWriter, step: int, method: MethodSpec, step_module: TrainStep,
                       batch: dict[str, Any]) -> None:
    """The method's own TensorBoard images (``MethodSpec.visualize``), in eval mode, without gradients."""
    modes = [(mod, mod.training) for mod in step_module.modules()]
    step_module.eval()
    try:
        with torch.no_grad():
            images = method.visualize(step_module.model, step_module.loss, batch)  # type: ignore[misc]
    finally:
        for mod, was_training in modes:
            mod.training = was_training
    for tag, image_HWC in (images or {}).items():
        writer.image(step, tag, image_HWC)
