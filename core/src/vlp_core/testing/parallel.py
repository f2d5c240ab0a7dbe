"""FSDP2 / HSDP / DDP equivalence with one process, for any method (2 gloo ranks on CPU).

:func:`parallel_report` runs :mod:`vlp_core.testing.parallel_worker` under torchrun for ``method_module``'s
smoke preset (or another preset, with ``key=value`` overrides) on a shapes world; :func:`check_parallel_equivalence`
asserts what the issue asks of every method: after 3 trainer steps every parameter (the loss's temperature and
bias included) is within 1e-7 of one process in float64 and 1e-5 in float32 under DDP, FSDP2 and HSDP
(:func:`check_report`, for a report a method's own torchrun worker made with the worker's functions). The worker
raises AdamW's eps to 1e-3: with 1e-6 a gradient entry near zero (an attention key bias's is exactly zero) turns
float32 summation-order noise into a step of about lr, under DDP exactly as under FSDP, which measures the
optimizer. Tensors whose reference run (float64 when there is one) moves by at most 1e-5 in 3 steps at lr 1e-3
(an exact or near-zero gradient: an attention key bias, or a bias whose shift a LayerNorm removes) hold only
summation noise, which AdamW normalises into steps even in float64: they are not compared (at most 8 such
tensors). Frozen parameters (``requires_grad`` off, e.g. the base weights under LoRA) need not move, but are
compared like the rest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vlp_core.testing.dist import run_torchrun

__all__ = ["MODES", "WORKER", "parallel_report", "check_report", "check_parallel_equivalence"]

WORKER = Path(__file__).with_name("parallel_worker.py")
MODES = ("ddp", "fsdp", "hsdp")


def parallel_report(world: str | Path, folder: str | Path, method_module: str = "vlp_core.clip",
                    timeout: int = 240, *, preset: str = "smoke", overrides: Sequence[str] = (),
                    dtypes: Sequence[str] = ("f32", "f64")) -> dict:
    """Rank 0's report (per mode and dtype: ``{tensor: max|p - p_ref| / max|p_ref|}``) of the worker;
    ``method_module`` may name another spec than ``METHOD`` as ``module:ATTR``."""
    out = Path(folder) / "parallel_report.json"
    extra = [a for item in overrides for a in ("--set", item)] + [a for tag in dtypes for a in ("--dtype", tag)]
    run_torchrun(WORKER, 2, "--world", str(world), "--out", str(out), "--method", method_module,
                 "--preset", preset, *extra, timeout=timeout)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    return per_rank[0]


def check_report(report: dict, *, loss_params: bool = True) -> dict[str, float]:
    """Assert the equivalence on a worker report; ``loss_params``: the loss has a temperature that must train
    (off for a fixed-scale loss). Returns the worst error per mode and dtype (``"fsdp_f32"``: ...)."""
    tags = [t for t in ("f64", "f32") if f"moved_{t}" in report]
    assert tags, f"the report has no dtype: {sorted(report)}"
    frozen = set(report.get("frozen", ()))
    static = set(report[f"static_{tags[0]}"]) - frozen  # float64's when there is a float64 run
    assert len(static) <= 8, f"too many tensors that do not train: {sorted(static)}"
    moved = {k: v for k, v in report[f"moved_{tags[-1]}"].items() if k not in static and k not in frozen}
    still = {k: v for k, v in moved.items() if v <= 1e-4}
    assert len(moved) > 10 and not still, f"tensors that did not train: {still}"
    if loss_params:
        assert any(k.startswith("loss.") for k in moved), "the loss's temperature did not train"
    worst = {}
    for tag in tags:
        tol = 1e-7 if tag == "f64" else 1e-5
        for mode in MODES:
            errs = {k: v for k, v in report[f"{mode}_{tag}"].items() if k not in static}
            bad = {k: v for k, v in errs.items() if v > tol}
            assert not bad, (mode, tag, bad)
            worst[f"{mode}_{tag}"] = max(errs.values())
    return worst


def check_parallel_equivalence(world: str | Path, folder: str | Path, method_module: str, *,
                               preset: str = "smoke", overrides: Sequence[str] = (),
                               dtypes: Sequence[str] = ("f32", "f64"), loss_params: bool = True) -> dict:
    """Assert FSDP2 == HSDP == DDP == one process for ``method_module``'s smoke model and loss; the report."""
    report = parallel_report(world, folder, method_module, preset=preset, overrides=overrides, dtypes=dtypes)
    check_report(report, loss_params=loss_params)
    return report
