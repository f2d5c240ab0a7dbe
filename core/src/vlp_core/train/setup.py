"""What a run needs before its first step: folders, the data, tokenizer, model, loss and adapter."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp_core.config import RunConfig
from vlp_core.distributed import DistInfo, barrier, broadcast_object, is_main
from vlp_core.logging.writer import RunWriter
from vlp_core.method import MethodSpec

__all__ = ["Parts", "build_parts", "resolve_output_dir", "resolve_world", "evaluate", "load_tokenizer"]

log = logging.getLogger("vlp")


@dataclass
class Parts:
    tokenizer: Any
    model: nn.Module
    loss: nn.Module
    adapter: Any
    train_data: str
    eval_root: Path | None


def resolve_output_dir(cfg: RunConfig) -> Path:
    """``train.output_dir``, or ``runs/<method>-<preset>-<time>`` (the newest such folder for ``--resume latest``).

    Decided on rank 0 and broadcast, so every rank writes to the same folder.
    """
    out = cfg.train.output_dir
    if not out and is_main():
        stem = f"{cfg.method}-{cfg.preset}"
        previous = sorted(Path("runs").glob(f"{stem}-*")) if Path("runs").is_dir() else []
        if cfg.train.resume == "latest" and previous:
            out = str(previous[-1])
        else:
            out = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = broadcast_object(out)
    cfg.train.output_dir = out
    path = Path(out)
    if is_main():
        path.mkdir(parents=True, exist_ok=True)
        ckpts = path / "checkpoints"
        if not cfg.train.resume and ckpts.is_dir() and any(ckpts.glob("step_*.pt")):
            raise ValueError(f"{path} already holds checkpoints: pass --resume latest to continue that run, "
                             "or choose another --output-dir")
    barrier()
    return path


def resolve_world(cfg: RunConfig, info: DistInfo) -> Path | None:
    """The shapes world's folder when it is needed (no ``train_data`` or no ``eval.data``); generated once."""
    evaluating = (cfg.eval.at_end or cfg.train.eval_every > 0) and not cfg.eval.data
    if cfg.data.train_data and cfg.model.text.tokenizer and not evaluating:
        return None
    from vlp_core.data.synthetic import ensure_world

    if is_main():
        world = ensure_world(cfg.data)
    barrier()
    world = ensure_world(cfg.data)  # already there: a cheap check on every rank
    return Path(world)


def load_tokenizer(cfg: RunConfig, world: Path | None):
    from vlp_core.data.tokenizer import Tokenizer

    source = cfg.model.text.tokenizer
    if not source:
        if world is None:
            raise ValueError("model.text.tokenizer is empty and no shapes world is in use: name a tokenizer")
        source = str(world / "tokenizer.json")
    return Tokenizer.from_pretrained(source, context_length=cfg.model.text.context_length)


def _world_train_pattern(world: Path) -> str:
    shards = sorted((world / "train").glob("*.tar"))
    if not shards:
        raise ValueError(f"no training shards in {world / 'train'}")
    return f"{world}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


def build_parts(cfg: RunConfig, method: MethodSpec, *, world: Path | None, device: torch.device) -> Parts:
    tokenizer = load_tokenizer(cfg, world)
    model = method.build_model(cfg, tokenizer)
    loss = method.build_loss(cfg)
    adapter = method.build_adapter(cfg, tokenizer)
    train_data = cfg.data.train_data or _world_train_pattern(world)  # type: ignore[arg-type]
    eval_root = Path(cfg.eval.data) if cfg.eval.data else world
    if is_main():
        n_params = sum(p.numel() for p in model.parameters())
        log.info("%s model: %.2fM parameters; training data: %s", method.name, n_params / 1e6, train_data)
    return Parts(tokenizer=tokenizer, model=model, loss=loss, adapter=adapter, train_data=train_data,
                 eval_root=eval_root)


def build_scorer(method: MethodSpec, model: nn.Module):
    if method.build_scorer is not None:
        return method.build_scorer(model)
    from vlp_core.eval import EmbeddingScorer

    return EmbeddingScorer(model)


def eval_autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(cfg: RunConfig, method: MethodSpec, parts: Parts, step_module: nn.Module, writer: RunWriter,
             step: int, device: torch.device) -> dict[str, float]:
    """Every rank evaluates its share of each set; results are identical on all ranks."""
    if parts.eval_root is None:
        return {}
    from vlp_core.eval import run_evaluation

    model = step_module.model if hasattr(step_module, "model") else step_module
    scorer = build_scorer(method, model)
    was_training = model.training
    model.eval()
    with eval_autocast(device, cfg.train.precision):
        results = run_evaluation(scorer, parts.tokenizer, cfg.eval, root=parts.eval_root,
                                 image_size=cfg.model.vision.image_size, device=device,
                                 log=log.info if is_main() else (lambda *a: None))
    model.train(was_training)
    writer.scalars(step, {f"eval/{k}": v for k, v in results.items()})
    if is_main():
        out = Path(cfg.train.output_dir) / "eval.jsonl"
        with open(out, "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        log.info("eval at step %d: %s", step, format_results(results))
    return results


def format_results(results: dict[str, float]) -> str:
    keys = [k for k in results if k.endswith(("top1", "R@1", "accuracy", "mean_recall"))]
    return ", ".join(f"{k} {results[k]:.1f}" for k in keys)
