"""2-process torchrun (gloo) vs one process on the same global batch: same loss, same gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import DIST_CHECKS, Towers, dist_inputs, make_loss

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "dist_worker.py"


def _single(name: str):
    model = Towers(make_loss(name))
    x = dist_inputs()
    loss = model(x["x_img"], x["x_patch"], x["x_txt"], x["caption_ids"])
    loss.backward()
    return loss.detach(), {k: q.grad for k, q in model.named_parameters() if q.grad is not None}


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "res.pt"
    run_torchrun(WORKER, 2, "--out", str(out), timeout=240)
    saved = torch.load(out)
    assert saved["world"] == 2
    results = saved["results"]
    assert sorted(results) == sorted(f"{n}_{h}" for n in DIST_CHECKS for h in ("manual", "ddp"))
    for key, got in results.items():
        ref_loss, ref_grads = _single(key.rsplit("_", 1)[0])
        assert torch.allclose(got["loss"], ref_loss, rtol=1e-10, atol=0), key
        assert got["grads"].keys() == ref_grads.keys(), key
        for k, g in ref_grads.items():
            assert g.abs().max() > 0, (key, k)  # a real gradient, not a vacuous match
            assert torch.allclose(got["grads"][k], g, rtol=1e-9, atol=1e-12), (key, k)
