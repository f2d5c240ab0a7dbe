"""torchrun worker: LCL's loss and gradients on 2 ranks with uneven image counts, one rank with no pair.

Every rank builds the same seeded float64 model and the same global batch (``dist_case.global_rows``),
keeps its own rows, runs the full model + loss, and averages gradients over ranks (by hand, and through
real DDP). Rank 0 saves the mean of the per-rank losses and both gradient sets to ``--out``; the pytest
side compares them with one process on the whole global batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (helpers, dist_case)

from dist_case import build, collate, grads  # noqa: E402

from vlp_core.distributed import all_gather_object, cleanup, init_distributed, wrap_ddp  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--world", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    info = init_distributed(device="cpu")
    step, adapter, rows = build(args.world)
    batch = collate(adapter, rows[info.rank])
    out = step(batch)
    out.loss.backward()
    manual = {}
    for name, g in grads(step).items():
        dist.all_reduce(g)
        manual[name] = g / info.world_size
    losses = all_gather_object(float(out.loss))
    counts = all_gather_object(int(batch["has_context"].sum()))
    step.zero_grad(set_to_none=True)
    ddp = wrap_ddp(step, info)
    ddp(batch).loss.backward()
    result = {"loss_mean": sum(losses) / len(losses), "manual": manual, "ddp": grads(step), "pairs": counts,
              "parts": {k: float(v) for k, v in out.parts.items()}}
    if info.rank == 0:
        torch.save(result, args.out)
    cleanup()


if __name__ == "__main__":
    main()
