"""torchrun worker: each rank takes its share of the seeded global batch, computes the DreamLIP loss and
its gradients (averaged by hand and through real DDP); rank 0 saves them for the single-process comparison
in test_dist.py."""

from __future__ import annotations

import argparse

import torch
from reference import DIST_CHECKS, G, Towers, dist_inputs, make_loss

from vlp_core.distributed import all_reduce_sum, cleanup, init_distributed, wrap_ddp


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    info = init_distributed(device="cpu")
    world, rank = info.world_size, info.rank
    b = G // world
    rows = slice(rank * b, (rank + 1) * b)
    x = {k: v[rows] for k, v in dist_inputs().items()}
    results = {}
    for name in DIST_CHECKS:
        for use_ddp in (False, True):
            model = Towers(make_loss(name))
            net = wrap_ddp(model, info) if use_ddp else model
            loss = net(x["x_img"], x["x_patch"], x["x_txt"], x["caption_ids"])
            loss.backward()
            if not use_ddp:
                for q in model.parameters():
                    if q.grad is not None:
                        all_reduce_sum(q.grad).div_(world)
            mean = all_reduce_sum(loss.detach().clone()) / world
            results[f"{name}_{'ddp' if use_ddp else 'manual'}"] = {
                "loss": mean, "grads": {k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None}}
    if rank == 0:
        torch.save({"world": world, "results": results}, args.out)
    cleanup()


if __name__ == "__main__":
    main()
