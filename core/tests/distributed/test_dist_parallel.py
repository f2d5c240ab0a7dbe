"""FSDP2 and HSDP == DDP == one process: parameters after 3 real trainer steps (2 gloo ranks, CPU).

vlp_core.testing.parallel_worker trains the CLIP smoke model + loss (AdamW with weight-decay groups, warmup + cosine,
global grad-norm clipping) for 3 steps on the same 3 batches: once in one process on the whole batches, then
on 2 ranks with half of each batch per rank under DDP, FSDP2 (``fully_shard`` per block, the loss's scalar
temperature replicated) and HSDP (a 2 x 1 replicate x shard mesh). Errors are per tensor:
``max|p - p_ref| / max|p_ref|``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlp_core.testing.parallel import MODES, parallel_report

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def report(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return parallel_report(tiny_world, tmp_path_factory.mktemp("parallel"))


def test_every_parameter_moved(report: dict) -> None:
    for tag in ("f32", "f64"):
        assert len(report[f"moved_{tag}"]) > 30
        # an untrained tensor would compare equal (the key bias, whose gradient is exactly zero, stays put)
        moved = {k: v for k, v in report[f"moved_{tag}"].items() if not k.endswith("[key]")}
        assert min(moved.values()) > 1e-4, tag


@pytest.mark.parametrize("mode", MODES)
def test_float64_matches_one_process(report: dict, mode: str) -> None:
    errs = report[f"{mode}_f64"]
    assert errs.keys() == report["moved_f64"].keys()
    bad = {k: v for k, v in errs.items() if v > 1e-7}
    assert not bad, bad


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_one_process(report: dict, mode: str) -> None:
    errs = report[f"{mode}_f32"]
    # Every tensor within 1e-5 of its largest value (AdamW eps 1e-3 in the worker: with 1e-6, near-zero
    # gradient entries such as the attention key bias turn float32 summation noise into steps of about lr).
    bad = {k: v for k, v in errs.items() if v > 1e-5}
    assert not bad, bad


def test_fsdp_equals_ddp(report: dict) -> None:
    for tag, tol in (("f32", 1e-6), ("f64", 1e-10)):
        bad = {k: v for k, v in report[f"fsdp_vs_ddp_{tag}"].items() if v > tol}
        assert not bad, (tag, bad)
