"""2-process torchrun (gloo) vs 1 process on the same global batch, for both stages: the first step's loss and
gradients (DDP, exact accumulation), and the parameters after 3 trainer steps under DDP, FSDP2 and HSDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import run_torchrun
from vlp_core.testing.parallel import check_report

pytestmark = pytest.mark.dist

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def two_rank_results(tiny_llama, tiny_bert, tiny_world, tmp_path_factory) -> Path:
    """One torchrun launch for every job of both stages (startup dominates on 2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    jobs = [f"llm={tiny_llama}", f"clip={tiny_bert}", f"llm_accum={tiny_llama}", f"clip_accum={tiny_bert}",
            f"world={tiny_world}", f"llm_parallel={tiny_llama}", f"mntp_parallel={tiny_llama}",
            f"clip_parallel={tiny_bert}"]
    run_torchrun(WORKERS / "dist_worker.py", 2, str(out), *jobs, timeout=300, env={"VLP_CACHE": str(out / "cache")})
    return out


@pytest.mark.parametrize("job", ["llm", "clip", "llm_accum", "clip_accum"])
def test_two_ranks_match_one_process(job, tiny_llama, tiny_bert, two_rank_results):
    """DDP gives the one-process loss and gradients; so does DDP with each rank's rows in 2 chunks through exact
    accumulation (SimCSE's gathered positives and negatives, stage 2's gathered columns and its temperature's
    gradient)."""
    stage = job.removesuffix("_accum")
    sys.path.insert(0, str(WORKERS))
    try:
        from dist_worker import build_stage, grads
    finally:
        sys.path.remove(str(WORKERS))
    text_model = str(tiny_llama if stage == "llm" else tiny_bert)
    got = torch.load(two_rank_results / f"{job}.pt", weights_only=True)
    assert got["world"] == 2
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


@pytest.mark.parametrize("stage", ["llm", "mntp", "clip"])
def test_fsdp_hsdp_ddp_match_one_process(stage, two_rank_results):
    """vlp-core's parameter check: after 3 trainer steps (fp32, AdamW eps 1e-3) every parameter under DDP, FSDP2
    and HSDP is within 1e-5 of its largest value of one process. Stage 1 (SimCSE with hard negatives on the tiny
    Llama; ``mntp``: LLM2Vec's masked next-token prediction, its loss normalised by the global count of masked
    tokens): only the LoRA weights train, the frozen base is compared too, FSDP2 shards the two decoder layers
    one by one; stage 2: vision tower, adapter and temperature on seeded Gaussian caption embeddings (the tiny
    BERT's are too alike for float32: see ``dist_worker.parallel_case``)."""
    report = json.loads((two_rank_results / f"{stage}_parallel.json").read_text())
    worst = check_report(report, loss_params=stage == "clip")
    print(stage, {k: f"{v:.1e}" for k, v in worst.items()})
    trained = [k for k in report["moved_f32"] if k not in report["frozen"]]
    if stage in ("llm", "mntp"):
        assert trained and all("lora_" in k for k in trained)  # only the LoRA weights train in stage 1
        assert any("base_layer" in k for k in report["frozen"])  # the frozen base weights are compared too
        assert report["sharded_fsdp"] == report["sharded_hsdp"] == 2 + 1  # the two decoder layers and the root
    else:
        assert not report["frozen"] and any(k.startswith("model.text_adapter.") for k in trained)
        assert report["sharded_fsdp"] == report["sharded_hsdp"] == 1 + 2 + 1  # vision block, adapter's 2, root
