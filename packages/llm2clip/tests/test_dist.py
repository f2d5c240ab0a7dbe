"""2-process torchrun (gloo) vs 1 process on the same global batch, for both stages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKERS = Path(__file__).parent / "workers"


def _has_fsdp() -> bool:
    try:
        from vlp_core.train.parallel import apply_parallel, sync_replicated_grads  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def two_rank_results(tiny_llama, tiny_bert, tmp_path_factory) -> Path:
    """One torchrun launch for both stages, under DDP and under FSDP2 (startup dominates on 2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    jobs = [f"llm={tiny_llama}", f"clip={tiny_bert}", f"llm_accum={tiny_llama}", f"clip_accum={tiny_bert}"]
    if _has_fsdp():
        jobs += [f"llm_fsdp={tiny_llama}", f"clip_fsdp={tiny_bert}"]
    run_torchrun(WORKERS / "dist_worker.py", 2, str(out), *jobs, timeout=200)
    return out


@pytest.mark.parametrize("job", ["llm", "clip", "llm_fsdp", "clip_fsdp", "llm_accum", "clip_accum"])
def test_two_ranks_match_one_process(job, tiny_llama, tiny_bert, two_rank_results):
    """DDP and FSDP2 (stage 1: the tiny Llama's decoder layers sharded one by one, LoRA inside them; stage 2:
    the vision blocks and the adapter's blocks) give the one-process loss and gradients; so does DDP with each
    rank's rows in 2 chunks through exact accumulation (SimCSE's gathered positives and negatives, stage 2's
    gathered columns and its temperature's gradient)."""
    if job.endswith("_fsdp") and not _has_fsdp():
        pytest.skip("the core has no FSDP2 (vlp_core.train.parallel)")
    stage = job.removesuffix("_fsdp").removesuffix("_accum")
    sys.path.insert(0, str(WORKERS))
    try:
        from dist_worker import build_stage, grads
    finally:
        sys.path.remove(str(WORKERS))
    text_model = str(tiny_llama if stage == "llm" else tiny_bert)
    got = torch.load(two_rank_results / f"{job}.pt", weights_only=True)
    assert got["world"] == 2
    if job == "llm_fsdp":
        assert got["fsdp_modules"] == 2 + 1  # the two decoder layers and the root
    step, batch = build_stage(stage, text_model)
    ref_loss = step(batch).loss
    ref_loss.backward()
    ref = grads(step)
    torch.testing.assert_close(got["loss"], ref_loss.detach(), rtol=1e-5, atol=1e-6)
    assert sorted(got["grads"]) == sorted(ref) and len(ref) > 4
    if stage == "llm":
        assert all("lora_" in n for n in ref)  # only the LoRA weights train in stage 1
    for name, g in ref.items():
        err = float((got["grads"][name] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        assert err < 1e-4, (name, err, float(g.abs().max()))
