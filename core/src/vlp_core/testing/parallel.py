"""FSDP2 / HSDP / DDP equivalence with one process, for any method (2 gloo ranks on CPU).

:func:`parallel_report` runs :mod:`vlp_core.testing.parallel_worker` under torchrun for ``method_module``'s
smoke preset on a shapes world; :func:`check_parallel_equivalence` asserts what the issue asks of every
method: after 3 trainer steps every parameter (the loss's temperature and bias included) is within 1e-7 of
one process in float64 and 1e-5 in float32 under DDP, FSDP2 and HSDP. The worker raises AdamW's eps to 1e-3:
with 1e-6 a gradient entry near zero (an attention key bias's is exactly zero) turns float32 summation-order
noise into a step of about lr, under DDP exactly as under FSDP, which measures the optimizer. Tensors whose
float64 run moves by at most 1e-5 in 3 steps at lr 1e-3 (an exact or near-zero gradient: an attention key
bias, or a bias whose shift a LayerNorm removes) hold only summation noise, which AdamW normalises into
steps even in float64: they are not compared (at most 8 such tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

from vlp_core.testing.dist import run_torchrun

__all__ = ["MODES", "WORKER", "parallel_report", "check_parallel_equivalence"]

WORKER = Path(__file__).with_name("parallel_worker.py")
MODES = ("ddp", "fsdp", "hsdp")


def parallel_report(world: str | Path, folder: str | Path, method_module: str = "vlp_core.clip",
                    timeout: int = 240) -> dict:
    """Rank 0's report (per mode and dtype: ``{tensor: max|p - p_ref| / max|p_ref|}``) of the worker."""
    out = Path(folder) / "parallel_report.json"
    run_torchrun(WORKER, 2, "--world", str(world), "--out", str(out), "--method", method_module, timeout=timeout)
    per_rank = json.loads(out.read_text())
    assert len(per_rank) == 2
    return per_rank[0]


def check_parallel_equivalence(world: str | Path, folder: str | Path, method_module: str) -> dict:
    """Assert FSDP2 == HSDP == DDP == one process for ``method_module``'s smoke model and loss; the report."""
    report = parallel_report(world, folder, method_module)
    static = set(report["static_f64"])
    assert len(static) <= 8, f"too many tensors that do not train: {sorted(static)}"
    moved = {k: v for k, v in report["moved_f32"].items() if k not in static}
    still = {k: v for k, v in moved.items() if v <= 1e-4}
    assert len(moved) > 10 and not still, f"tensors that did not train: {still}"
    assert any(k.startswith("loss.") for k in moved), "the loss's temperature did not train"
    for mode in MODES:
        bad64 = {k: v for k, v in report[f"{mode}_f64"].items() if v > 1e-7 and k not in static}
        assert not bad64, (mode, bad64)
        bad32 = {k: v for k, v in report[f"{mode}_f32"].items() if v > 1e-5 and k not in static}
        assert not bad32, (mode, bad32)
    return report
