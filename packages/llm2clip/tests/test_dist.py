"""2-process torchrun (gloo) vs 1 process on the same global batch, for both stages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def two_rank_results(tiny_llama, tiny_bert, tmp_path_factory) -> Path:
    """One torchrun launch for both stages (startup dominates on 2 cores)."""
    out = tmp_path_factory.mktemp("dist")
    run_torchrun(WORKERS / "dist_worker.py", 2, str(out), f"llm={tiny_llama}", f"clip={tiny_bert}", timeout=150)
    return out


@pytest.mark.parametrize("stage", ["llm", "clip"])
def test_two_ranks_match_one_process(stage, tiny_llama, tiny_bert, two_rank_results):
    sys.path.insert(0, str(WORKERS))
    try:
        from dist_worker import build_stage, grads
    finally:
        sys.path.remove(str(WORKERS))
    text_model = str(tiny_llama if stage == "llm" else tiny_bert)
    got = torch.load(two_rank_results / f"{stage}.pt", weights_only=True)
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
