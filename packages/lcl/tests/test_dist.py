"""2 processes (gloo) with uneven image counts, one rank with zero contrastive pairs, vs 1 process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_case import build, collate, grads

from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "lcl_worker.py"


def test_two_ranks_uneven_images_match_one_process(tiny_world, tmp_path: Path) -> None:
    out = tmp_path / "result.pt"
    run_torchrun(WORKER, 2, "--world", str(tiny_world), "--out", str(out), timeout=150)
    result = torch.load(out)
    assert result["pairs"][0] == 0 and result["pairs"][1] >= 3  # the case really is uneven
    step, adapter, rows = build(str(tiny_world))
    batch = collate(adapter, rows[0] + rows[1])
    ref = step(batch)
    ref.loss.backward()
    want = grads(step)
    torch.testing.assert_close(torch.tensor(result["loss_mean"], dtype=torch.float64), ref.loss.detach(),
                               rtol=1e-10, atol=1e-12)
    for k in ("loss_con", "loss_gen", "pairs"):
        assert abs(result["parts"][k] - float(ref.parts[k])) < 1e-9 * max(1.0, abs(float(ref.parts[k])))
    assert float(ref.parts["loss_con"]) > 0
    for how in ("manual", "ddp"):
        got = result[how]
        assert sorted(got) == sorted(want)
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-8, atol=1e-11, msg=f"{how} {name}")
    # The contrastive term matters to the gradient of the pooling (a case that does not test it is no test).
    assert want["model.pool.query"].abs().sum() > 0 and want["loss.logit_scale"].abs() > 0
