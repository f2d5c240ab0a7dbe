"""AdamW with weight-decay groups, and the warmup + cosine schedule."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from vlp_core.config import OptimConfig

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_at"]

# Parameters with these name fragments never decay: embeddings, learnable tokens, temperatures.
_NO_DECAY = ("bias", "norm", "ln_", "pos_embed", "positional", "cls_token", "reg_token", "token_embedding",
             "logit_scale", "logit_bias", "embedding")


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Two groups: decayed weight matrices, and everything 1-D or named in ``_NO_DECAY`` without decay.

    A parameter carrying a float attribute ``lr_scale`` != 1 (set by a model for layer-wise lr decay) goes
    into an extra group per (decay, scale) whose ``lr`` is ``lr * lr_scale`` (``lr`` must then be given);
    the schedule multiplies every group's initial lr alike. Without such parameters the two groups above
    are returned unchanged.
    """
    decay, no_decay = [], []
    scaled: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim < 2 or any(k in name.lower() for k in _NO_DECAY)
        scale = float(getattr(p, "lr_scale", 1.0))
        if scale != 1.0:
            scaled.setdefault((no_wd, scale), []).append(p)
        elif no_wd:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if scaled and lr is None:
        raise ValueError("parameters with an lr_scale need the base lr: param_groups(..., lr=...)")
    for (no_wd, scale), params in scaled.items():
        groups.append({"params": params, "weight_decay": 0.0 if no_wd else weight_decay,
                       "lr": lr * scale, "lr_scale": scale})  # type: ignore[operator]
    return groups


def build_optimizer(module: nn.Module, cfg: OptimConfig, *, device: torch.device) -> torch.optim.AdamW:
    """AdamW; the fused kernel on CUDA (it also lets the NaN guard skip a step without a host sync)."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay, cfg.lr), **kwargs)


def lr_at(step: int, *, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warmup, then cosine or constant."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, total=total_steps, cfg=cfg))
