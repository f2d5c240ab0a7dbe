"""The step-based trainer: ``run(cfg, method)`` is all a method's CLI calls.

One step = ``accum_steps`` micro-batches whose sizes add up to the global batch over all ranks. The loop
reads host values only at log steps; the NaN/Inf guard skips a non-finite step on the device where the
fused optimizer allows it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp_core.config import RunConfig, dump_yaml, to_dict
from vlp_core.data.transforms import prepare_images
from vlp_core.data.wds import BatchMeta, WdsPipeline, build_train_loader, parse_sources
from vlp_core.distributed import DistInfo, all_gather_object, barrier, init_distributed, is_main, wrap_ddp
from vlp_core.logging.writer import RunWriter, caption_grid
from vlp_core.method import LossOutput, MethodSpec
from vlp_core.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from vlp_core.train.optim import build_optimizer, build_scheduler
from vlp_core.train.setup import build_parts, evaluate, resolve_output_dir, resolve_world

__all__ = ["run", "TrainStep"]

log = logging.getLogger("vlp")


class TrainStep(nn.Module):
    """Model and loss as one module, so DDP syncs the loss's learnable temperature and bias too."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        return self.loss(self.model(batch), batch)


@dataclass
class _State:
    step: int = 0
    data: dict[int, int] = field(default_factory=dict)  # logical worker -> raw samples consumed
    skipped: dict[str, int] = field(default_factory=dict)
    batches: int = 0  # micro-batches consumed on this rank


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


def _checkpoint_state(state: _State, step_module: nn.Module, optimizer, scheduler, scaler,
                      cfg: RunConfig) -> dict[str, Any] | None:
    """Gathers every rank's RNG and data position; returns the full state on rank 0 only."""
    per_rank = all_gather_object({"rng": rng_state(), "data": dict(state.data), "batches": state.batches})
    if not is_main():
        return None
    module = step_module.module if hasattr(step_module, "module") else step_module
    module = getattr(module, "_orig_mod", module)
    return {
        "step": state.step,
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ranks": per_rank,
        "skipped": dict(state.skipped),
        "config": to_dict(cfg),
    }


def run(cfg: RunConfig, method: MethodSpec) -> dict[str, float]:
    """Train ``method`` with ``cfg``; returns the final evaluation metrics (empty if evaluation is off)."""
    cfg.validate()
    info = init_distributed()
    torch.manual_seed(cfg.train.seed + info.rank)
    out_dir = resolve_output_dir(cfg)
    world = resolve_world(cfg, info)
    parts = build_parts(cfg, method, world=world, device=info.device)
    writer = RunWriter(out_dir, enabled=is_main())
    if is_main():
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        log.info("run folder: %s", out_dir)
    try:
        return _train(cfg, method, info, parts, writer, out_dir)
    finally:
        writer.close()


def _train(cfg: RunConfig, method: MethodSpec, info: DistInfo, parts: Any, writer: RunWriter,
           out_dir: Path) -> dict[str, float]:
    t = cfg.train
    device = info.device
    micro = t.batch_size // (info.world_size * t.accum_steps)
    if micro * info.world_size * t.accum_steps != t.batch_size or micro == 0:
        raise ValueError(f"train.batch_size {t.batch_size} must be divisible by world size {info.world_size} "
                         f"x accum_steps {t.accum_steps}")
    step_module = TrainStep(parts.model, parts.loss).to(device)
    if t.grad_checkpointing and hasattr(parts.model, "set_grad_checkpointing"):
        parts.model.set_grad_checkpointing(True)
    optimizer = build_optimizer(step_module, cfg.optim, device=device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=t.steps)
    autocast, precision = _autocast(cfg, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ckpt = CheckpointManager(out_dir / "checkpoints", keep=t.keep_checkpoints)
    state = _State()
    path = ckpt.resolve(t.resume)
    if path is not None:
        saved = ckpt.load(path)
        step_module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        ranks = saved["ranks"]
        if len(ranks) != info.world_size:
            raise ValueError(f"checkpoint {path} was written by {len(ranks)} ranks; this run has "
                             f"{info.world_size}: exact resume needs the same world size")
        mine = ranks[info.rank]
        set_rng_state(mine["rng"])
        state = _State(step=saved["step"], data={int(k): v for k, v in mine["data"].items()},
                       skipped=dict(saved.get("skipped", {})), batches=mine["batches"])
        log.info("resumed from %s at step %d", path, state.step)
    elif t.resume and t.resume != "latest":
        raise ValueError(f"checkpoint not found: {t.resume}")
    if t.init_from and path is None:
        from vlp_core.train.init_from import init_from

        init_from(step_module, t.init_from, cfg)
    elif t.init_from:
        log.info("resuming %s: train.init_from (%s) is not applied again", path, t.init_from)
    model_for_train = step_module
    if t.compile:
        model_for_train = torch.compile(model_for_train)
    model_for_train = wrap_ddp(model_for_train, info)

    workers = max(cfg.data.workers, 1)
    pipeline = WdsPipeline(
        parse_sources(parts.train_data, cfg.data.train_weights), parts.adapter, batch_size=micro,
        seed=cfg.data.seed, rank=info.rank, world_size=info.world_size, resampled=cfg.data.resampled,
        shuffle_buffer=cfg.data.shuffle_buffer, start=state.data,
        worker_offset=state.batches % workers if cfg.data.workers > 0 else 0, seed_samples=True)
    loader = iter(build_train_loader(pipeline, workers=cfg.data.workers, pin_memory=device.type == "cuda"))

    kill_at = int(os.environ.get("VLP_DEBUG_KILL_AT_STEP", "0"))
    progress = None
    if is_main() and t.progress:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=state.step, desc=f"{method.name}-train", dynamic_ncols=True)
    window_start, wait_time, window_steps = time.perf_counter(), 0.0, 0
    nonfinite = torch.zeros((), device=device)
    last_parts: dict[str, torch.Tensor] = {}
    model_for_train.train()
    while state.step < t.steps:
        optimizer.zero_grad(set_to_none=True)
        for m in range(t.accum_steps):
            t0 = time.perf_counter()
            batch, meta = next(loader)
            wait_time += time.perf_counter() - t0
            _account(state, meta)
            if is_main() and t.image_grid_every and state.step % t.image_grid_every == 0 and m == 0:
                _log_grid(writer, state.step, batch)
            batch = _to_device(batch, device, mean=cfg.model.vision.image_mean, std=cfg.model.vision.image_std)
            if (method.visualize is not None and is_main() and t.image_grid_every
                    and state.step % t.image_grid_every == 0 and m == 0):
                _log_method_images(writer, state.step, method, step_module, batch)
            sync = m == t.accum_steps - 1 or not hasattr(model_for_train, "no_sync")
            with (contextlib.nullcontext() if sync else model_for_train.no_sync()), autocast:
                out = model_for_train(batch)
                loss = out.loss / t.accum_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        last_parts = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.parts.items()}}
        _optimizer_step(step_module, optimizer, scaler, t.grad_clip, nonfinite, last_parts)
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
        if state.step % t.save_every == 0 or state.step == t.steps:
            full = _checkpoint_state(state, step_module, optimizer, scheduler, scaler, cfg)
            if full is not None:
                ckpt.save(full, state.step)
        if kill_at and state.step == kill_at:  # test hook: die like a pre-empted job
            barrier()  # rank 0 has finished writing the checkpoint before any rank dies
            os.kill(os.getpid(), signal.SIGKILL)
        if t.eval_every and state.step % t.eval_every == 0 and state.step != t.steps:
            evaluate(cfg, method, parts, step_module, writer, state.step, device)
            model_for_train.train()
    if progress is not None:
        progress.close()
    results: dict[str, float] = {}
    if cfg.eval.at_end:
        results = evaluate(cfg, method, parts, step_module, writer, state.step, device)
    if is_main() and state.skipped:
        log.info("skipped samples: %s", state.skipped)
    return results


def _account(state: _State, meta: BatchMeta) -> None:
    state.data[meta.worker] = meta.raw
    state.batches += 1
    for reason, n in meta.skipped.items():
        state.skipped[reason] = state.skipped.get(reason, 0) + n
    for msg in meta.examples:
        log.warning("skipped sample: %s", msg)


def _optimizer_step(module: nn.Module, optimizer, scaler, grad_clip: float, nonfinite: torch.Tensor,
                    parts: dict[str, torch.Tensor]) -> None:
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in module.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    parts["grad_norm"] = norm.detach()
    if scaler is not None:  # the scaler already skips non-finite steps
        scaler.step(optimizer)
        scaler.update()
        return
    bad = (~torch.isfinite(norm)) | (~torch.isfinite(parts["loss"]))
    if getattr(optimizer, "defaults", {}).get("fused"):
        # The fused AdamW reads ``found_inf`` on the device and skips the update: no host sync.
        optimizer.found_inf = bad.float()
        optimizer.step()
        optimizer.found_inf = None
    elif not bool(bad):  # CPU path: a host read here is free
        optimizer.step()
    nonfinite.mul_(bad.float()).add_(bad.float())  # consecutive non-finite steps


def _log_step(writer: RunWriter, state: _State, parts: dict[str, torch.Tensor], optimizer, nonfinite,
              t, elapsed: float, wait: float, steps: int, progress) -> None:
    values = {f"train/{k}": float(v) for k, v in parts.items()}
    values["train/lr"] = optimizer.param_groups[0]["lr"]
    values["train/samples_per_s"] = steps * t.batch_size / max(elapsed, 1e-9)
    values["train/data_wait_frac"] = wait / max(elapsed, 1e-9)
    for reason, n in state.skipped.items():
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
