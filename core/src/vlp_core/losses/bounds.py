"""Bounds on a loss's learnable scalars (temperatures), applied to the stored parameters after every step.

Why: the losses clamp their log-space scale in the forward pass (``torch.clamp``), which keeps the logits
capped but not the parameter. Once an optimizer step carries the stored value past the cap, the forward
clamp's gradient is zero there, so nothing ever brings it back: the temperature is frozen for good, and a
later change of the cap or a converted checkpoint sees a value nobody trained. OpenCLIP (and the official
code of ALIP, DreamLIP, LCL, Llip and LLM2CLIP) clamps the parameter itself to ``[0, ln 100]`` after each
optimizer step; ``torch.clamp``'s gradient is nonzero *at* a bound (both bounds are inclusive), so a scale
held at the cap still learns to come down.

A loss declares which of its own parameters are bounded (:func:`declare_bounds`, in its ``__init__``) and its
``after_step(finite)`` hook (called by the trainer once per optimizer step, see :mod:`vlp_core.method`) calls
:func:`clamp_bounds_` on itself, which walks every submodule, so a wrapper loss around the core's
:class:`~vlp_core.losses.ClipLoss` clamps the inner one too. The clamp is in place, under ``no_grad``, on the
device (no host sync), for plain tensors and for DTensors alike (FSDP2 keeps the 0-dim scalars replicated,
:mod:`vlp_core.train.parallel`; a replicated DTensor is clamped on its local copy, identical on every rank).
It runs whether or not the step was skipped: after a skipped step the parameter is unchanged and the clamp
is a no-op, and a checkpoint or an init that put it out of bounds is brought in at the first step.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

__all__ = ["LOG_SCALE_MIN", "log_scale_bounds", "declare_bounds", "bounded_scalars", "clamp_bounds_"]

# ``logit_scale >= 0``, i.e. a temperature of at most 1 (OpenCLIP's lower bound).
LOG_SCALE_MIN = 0.0

_ATTR = "_vlp_bounds"

Bounds = tuple[float | None, float | None]


def log_scale_bounds(max_logit_scale: float, *, key: str = "max_logit_scale") -> tuple[float, float]:
    """``(0, ln max_logit_scale)``: the bounds of a log-space scale capped at ``exp(logit_scale) <= max``.

    ``max_logit_scale`` must be at least 1 (a temperature cap ``T >= 1 / max`` above 1 makes no sense, and
    the lower bound 0 would exceed the upper one); ``key`` names it in the error.
    """
    if not max_logit_scale >= 1.0:
        raise ValueError(f"{key} must be >= 1 (exp(logit_scale) is kept in [1, {key}]), got {max_logit_scale}")
    return LOG_SCALE_MIN, math.log(max_logit_scale)


def declare_bounds(module: nn.Module, **bounds: Bounds) -> None:
    """Declare ``name=(lower, upper)`` bounds (``None``: open) on parameters of ``module`` itself.

    Parameters set to ``None`` (an optional temperature that is off) are skipped by :func:`clamp_bounds_`.
    """
    table: dict[str, Bounds] = dict(getattr(module, _ATTR, {}))
    for name, (lower, upper) in bounds.items():
        if not hasattr(module, name):
            raise AttributeError(f"{type(module).__name__} has no parameter {name!r} to bound")
        p = getattr(module, name)
        if p is not None and not isinstance(p, nn.Parameter):
            raise TypeError(f"{type(module).__name__}.{name} is not a parameter; only parameters are bounded")
        if lower is not None and upper is not None and lower > upper:
            raise ValueError(f"{type(module).__name__}.{name}: lower bound {lower} > upper bound {upper}")
        table[name] = (None if lower is None else float(lower), None if upper is None else float(upper))
    object.__setattr__(module, _ATTR, table)  # a plain attribute (floats): no state-dict entry, meta-safe


def bounded_scalars(module: nn.Module) -> list[tuple[str, nn.Parameter, float | None, float | None]]:
    """``(qualified name, parameter, lower, upper)`` of every declared bound in ``module`` and below."""
    out = []
    for prefix, sub in module.named_modules():
        for name, (lower, upper) in getattr(sub, _ATTR, {}).items():
            p = getattr(sub, name, None)
            if p is not None:
                out.append((f"{prefix}.{name}" if prefix else name, p, lower, upper))
    return out


@functools.lru_cache(maxsize=256)
def _inward(bound: float, dtype: torch.dtype, upper: bool) -> float:
    """``bound`` rounded to ``dtype`` towards the inside of the interval (a Python float exact in ``dtype``).

    Why: ``ln 100`` in float32 rounds *up*, and ``torch.clamp(p, max=ln 100)`` compares in double in its
    backward, so a parameter clamped to ``float32(ln 100)`` would sit past the forward's cap with zero gradient
    again. One ulp inside, the forward clamp lets the gradient through.
    """
    t = torch.tensor(bound, dtype=dtype)
    if (float(t) > bound) if upper else (float(t) < bound):
        t = torch.nextafter(t, torch.tensor(-math.inf if upper else math.inf, dtype=dtype))
    return float(t)


@torch.no_grad()
def clamp_bounds_(module: nn.Module) -> None:
    """Clamp every declared bounded parameter of ``module`` (and its submodules) into its bounds, in place."""
    for _, p, lower, upper in bounded_scalars(module):
        local = p.to_local() if hasattr(p, "to_local") else p  # a replicated DTensor: its (full) local copy
        lo = None if lower is None else _inward(lower, local.dtype, upper=False)
        hi = None if upper is None else _inward(upper, local.dtype, upper=True)
        # ``.data``: the same storage without bumping autograd's version counter, so a graph still holding the
        # parameter (a caller that runs after_step before backward) stays valid when nothing moved.
        local.data.clamp_(min=lo, max=hi)
