"""Test helper: drive a loss's bounded scalar past its bound with a real optimizer step, then ``after_step``.

Shared by the core's and the method packages' fault tests (a package test must not reach into another
package's tests). The step is the trainer's own: AdamW with its parameter groups
(:func:`vlp_core.train.optim.build_optimizer`, :func:`vlp_core.train.parallel.split_scalar_groups`) and the
NaN-guarded ``_optimizer_step`` of :mod:`vlp_core.train.loop`, then the loss's ``after_step`` with the step's
finite flag, in the order the loop calls them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp_core.config import OptimConfig
from vlp_core.losses.bounds import bounded_scalars

__all__ = ["push_past_bound", "bounded_names", "check_temperatures"]


def bounded_names(loss: nn.Module) -> set[str]:
    """Qualified names of the parameters ``loss`` declares bounds for."""
    return {name for name, *_ in bounded_scalars(loss)}


def push_past_bound(loss: nn.Module, name: str, *, upper: bool, lr: float = 1.0) -> tuple[float, float, float]:
    """One AdamW step that carries parameter ``name`` about ``lr`` past its upper (or lower) bound.

    The parameter starts 0.1 inside the bound and gets a unit gradient pointing out of it (every other
    parameter a zero gradient); AdamW's first step moves it by ``lr`` (its update is ``lr * sign(grad)``).
    Then ``loss.after_step(finite)`` as the trainer calls it.

    Returns:
        ``(value after the optimizer step, value after after_step, the bound)``.
    """
    from vlp_core.train.loop import _optimizer_step
    from vlp_core.train.optim import build_optimizer
    from vlp_core.train.parallel import split_scalar_groups

    found = {n: (p, lo, hi) for n, p, lo, hi in bounded_scalars(loss)}
    if name not in found:
        raise KeyError(f"{type(loss).__name__} declares no bound on {name!r} (bounded: {sorted(found)})")
    param, lower, high = found[name]
    bound = high if upper else lower
    if bound is None:
        raise ValueError(f"{name} has no {'upper' if upper else 'lower'} bound")
    optimizer = build_optimizer(loss, OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=0),
                                device=torch.device("cpu"))
    split_scalar_groups(optimizer)
    with torch.no_grad():
        param.fill_(bound - 0.1 if upper else bound + 0.1)
    for p in loss.parameters():
        p.grad = torch.zeros_like(p)
    param.grad = torch.full_like(param, -1.0 if upper else 1.0)  # descent moves against the gradient
    nonfinite = torch.zeros(())
    skipped = _optimizer_step(loss, optimizer, None, 0.0, nonfinite, {"loss": torch.zeros(())})
    pushed = param.item()
    loss.after_step(~skipped)
    return pushed, param.item(), float(bound)


def check_temperatures(method: Any, names: set[str], *, preset: str = "smoke",
                       max_logit_scale: float = 100.0) -> None:
    """Assert ``method``'s loss bounds exactly its ``logit_scale`` parameters, ``names``, to [0, ln max], and
    that each, pushed past either bound by a real AdamW step, comes back onto the bound in ``after_step``."""
    import math

    temperatures = {n for n, _ in method.build_loss(method.preset(preset)).named_parameters() if "logit_scale" in n}
    assert bounded_names(method.build_loss(method.preset(preset))) == temperatures == names
    top = math.log(max_logit_scale)
    for name in sorted(names):
        for upper in (True, False):
            pushed, after, bound = push_past_bound(method.build_loss(method.preset(preset)), name, upper=upper)
            assert bound == (top if upper else 0.0), (name, upper, bound)
            assert (pushed > bound + 0.5) if upper else (pushed < bound - 0.5), (name, upper, pushed)  # carried out
            assert abs(after - bound) <= 1e-6 and 0.0 <= after <= top, (name, upper, after)
