"""torchrun worker: the Llip model + loss on a 1/W share of a global batch vs one process on all of it.

Every rank builds the same float64 tiny model (same seed) and the same seeded global batch of N = W*B
images and captions, runs model + loss on its B rows, averages the gradients over ranks (by hand, and
through real DDP) and compares loss and every gradient with the pair-by-pair float64 reference
(``llip_reference.reference_loss`` on the whole batch, no process group involved). Rank 0 writes the
errors and the averaged gradients (for the single-process comparison on the pytest side) to ``--out``.

Tensor-name legend: B per-rank batch, N = W*B global batch, K mixture tokens, W tower width.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llip_reference import reference_loss  # noqa: E402
from vlp_llip import METHOD, LlipLoss, LlipModel  # noqa: E402

from vlp_core.distributed import all_gather_object, all_reduce_sum, cleanup, init_distributed, wrap_ddp  # noqa: E402
from vlp_core.train.loop import TrainStep  # noqa: E402

F64 = torch.float64
B = 3  # per rank; chunk 2 makes ragged blocks


def build(ring: str) -> TrainStep:
    cfg = METHOD.preset("smoke")
    cfg.model.vision.extra_tokens, cfg.model.embed_dim = 3, 8
    cfg.loss.heads, cfg.loss.tau, cfg.loss.chunk, cfg.loss.ring = 2, 2.0, 2, ring
    cfg.loss.init_logit_scale, cfg.loss.init_bias = 1.5, -1.0  # bias/scale gradients far from zero
    torch.manual_seed(1234)
    return TrainStep(LlipModel(cfg.model, cfg.loss, vocab_size=50, pad_id=0), LlipLoss(cfg.loss)).to(F64)


def global_batch(n: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {"images": torch.randn(n, 3, 32, 32, generator=gen, dtype=F64),
            "tokens": torch.randint(1, 50, (n, 16), generator=gen)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    diff = float((a - b).abs().max())
    return 0.0 if diff <= 1e-13 else diff / max(float(b.abs().max()), 1e-30)


def reference(world: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of the whole global batch, pair by pair (no process group involved)."""
    ref = build("bidir")
    m = ref.model
    data = global_batch(B * world)
    h_NKW, g_NW = m.mixture_tokens(data["images"]), m.text_hidden(data["tokens"])
    ref_loss = reference_loss(m, h_NKW, g_NW, ref.loss.clamped_scale(), ref.loss.logit_bias, tau=m.tau)
    ref_loss.backward()
    return ref_loss.detach(), {k: p.grad.clone() for k, p in ref.named_parameters() if p.grad is not None}


def check(ring: str, use_ddp: bool, rank: int, world: int, info: object,
          ref: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> tuple[float, dict]:
    ref_loss, ref_grads = ref
    step = build(ring)
    net = wrap_ddp(step, info) if use_ddp else step
    rows = slice(rank * B, (rank + 1) * B)
    loss = net({k: v[rows] for k, v in global_batch(B * world).items()}).loss
    loss.backward()
    if not use_ddp:
        for p in step.parameters():
            if p.grad is not None:
                all_reduce_sum(p.grad).div_(world)
    mean_loss = all_reduce_sum(loss.detach().clone()) / world
    grads = {k: p.grad.clone() for k, p in step.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    errs = [rel_err(mean_loss, ref_loss)] + [rel_err(grads[k], ref_grads[k]) for k in ref_grads]
    return max(errs), {"loss": mean_loss, **grads}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    rank, world = info.rank, info.world_size
    errors: dict[str, float] = {}
    saved = {}
    ref = reference(world)
    for ring in ("bidir", "shift"):
        for use_ddp in (False, True):
            key = f"{ring}_{'ddp' if use_ddp else 'manual'}"
            errors[key], saved[key] = check(ring, use_ddp, rank, world, info, ref)
    per_rank = all_gather_object(errors)
    if rank == 0:
        merged = {k: max(r[k] for r in per_rank) for k in errors}
        torch.save({"world_size": world, "errors": merged, "results": saved}, args.out)
    cleanup()


if __name__ == "__main__":
    main()
