"""torchrun worker: distributed collectives and losses vs single-process float64 references.

Every rank builds the same seeded global batch and tiny two-tower "model", takes its 1/W share of the
rows, runs the distributed loss and averages gradients over ranks (by hand, and through real DDP), then
compares with an independent full-batch float64 reference computed locally (no process group involved).
Rank 0 writes ``{check: max relative error over ranks}`` to ``--out``; the pytest side applies tolerances.
Unexpected exceptions crash the worker (torchrun then stops the others and the test sees the output).

Tensor-name legend:
    B: per-rank batch, W: world size, N = W*B: global batch, D: embedding dim, DI/DT: tower input dims.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import (
    all_gather_no_grad,
    all_gather_object,
    all_gather_with_grad,
    all_reduce_sum,
    broadcast_object,
    cleanup,
    init_distributed,
    neighbour_exchange_bidir_with_grad,
    neighbour_exchange_with_grad,
    wrap_ddp,
)
from vlp_core.losses import ClipLoss, SigLipLoss

F64 = torch.float64
B, D, DI, DT = 3, 5, 7, 6  # per-rank batch 3 keeps the logits non-square for W > 1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Towers(nn.Module):
    """Two linear towers plus the loss module, so DDP sees the temperature/bias parameters too."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(1234)  # identical init on every rank and in the reference
        self.img = nn.Linear(DI, D).to(F64)
        self.txt = nn.Linear(DT, D).to(F64)
        self.loss = loss.to(F64)

    def forward(self, x_img_BI: torch.Tensor, x_txt_BT: torch.Tensor) -> torch.Tensor:
        return self.loss(self.img(x_img_BI), self.txt(x_txt_BT)).loss


def ref_clip(
    zi_ND: torch.Tensor, zt_ND: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Full N x N InfoNCE (both directions), float64."""
    zi_ND, zt_ND = zi_ND / zi_ND.norm(dim=1, keepdim=True), zt_ND / zt_ND.norm(dim=1, keepdim=True)
    logits_NN = scale.exp() * zi_ND @ zt_ND.T
    labels_N = torch.arange(len(zi_ND))
    return (F.cross_entropy(logits_NN, labels_N) + F.cross_entropy(logits_NN.T, labels_N)) / 2


def ref_siglip(
    zi_ND: torch.Tensor, zt_ND: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Full N x N sigmoid loss with +-1 labels, summed over pairs, divided by N, float64."""
    zi_ND, zt_ND = zi_ND / zi_ND.norm(dim=1, keepdim=True), zt_ND / zt_ND.norm(dim=1, keepdim=True)
    labels_NN = 2 * torch.eye(len(zi_ND), dtype=F64) - 1
    logits_NN = scale.exp() * zi_ND @ zt_ND.T + bias
    return -F.logsigmoid(labels_NN * logits_NN).sum() / len(zi_ND)


def check_loss(
    make_loss: Callable[[], nn.Module],
    ref: Callable[..., torch.Tensor],
    rank: int,
    world: int,
    use_ddp: bool,
    info: object,
) -> float:
    """Max relative error of (mean loss over ranks, every averaged gradient) vs the full-batch reference."""
    n = B * world
    x_img_NI, x_txt_NT = seeded(11, n, DI), seeded(12, n, DT)

    # Reference: whole batch in one process, its own loss code, float64.
    ref_model = Towers(make_loss())
    scale_p, bias_p = (
        ref_model.loss.logit_scale,
        getattr(ref_model.loss, "logit_bias", torch.zeros((), dtype=F64)),
    )
    ref_loss = ref(ref_model.img(x_img_NI), ref_model.txt(x_txt_NT), scale_p, bias_p)
    ref_loss.backward()
    ref_grads = {k: p.grad.clone() for k, p in ref_model.named_parameters()}

    model = Towers(make_loss())
    net = wrap_ddp(model, info) if use_ddp else model
    rows = slice(rank * B, (rank + 1) * B)
    loss = net(x_img_NI[rows], x_txt_NT[rows])
    loss.backward()
    if not use_ddp:  # what DDP does: mean of gradients over ranks
        for p in model.parameters():
            all_reduce_sum(p.grad).div_(world)
    mean_loss = all_reduce_sum(loss.detach().clone()) / world

    errs = [rel_err(mean_loss, ref_loss.detach())]
    for k, p in model.named_parameters():
        errs.append(rel_err(p.grad, ref_grads[k]))
    return max(errs)


def check_gather(rank: int, world: int) -> float:
    n = B * world
    x_BD = seeded(100 + rank, B, D).requires_grad_(True)
    y_ND = all_gather_with_grad(x_BD)
    w_ND = seeded(200 + rank, n, D)
    (w_ND * y_ND).sum().backward()
    want_y_ND = torch.cat([seeded(100 + q, B, D) for q in range(world)])
    # d(sum_q loss_q)/dx_r: every rank's weights restricted to rank r's rows.
    want_g_BD = sum(seeded(200 + q, n, D) for q in range(world))[rank * B : (rank + 1) * B]
    ng_ND = all_gather_no_grad(x_BD)
    assert not ng_ND.requires_grad, "all_gather_no_grad must return a detached tensor"
    return max(rel_err(y_ND, want_y_ND), rel_err(x_BD.grad, want_g_BD), rel_err(ng_ND, want_y_ND))


def check_shift(rank: int, world: int, step: int) -> float:
    to_rank, from_rank = (rank + step) % world, (rank - step) % world
    x_BD = seeded(300 + rank, B, D).requires_grad_(True)
    y_BD = neighbour_exchange_with_grad(x_BD, to_rank=to_rank, from_rank=from_rank)
    (seeded(400 + rank, B, D) * y_BD).sum().backward()
    # x_r landed on rank r+step, where it was weighted by that rank's weights.
    return max(rel_err(y_BD, seeded(300 + from_rank, B, D)), rel_err(x_BD.grad, seeded(400 + to_rank, B, D)))


def check_bidir(rank: int, world: int) -> float:
    left, right = (rank - 1) % world, (rank + 1) % world
    a_BD = seeded(500 + rank, B, D).requires_grad_(True)  # sent left
    c_BD = seeded(600 + rank, B, D).requires_grad_(True)  # sent right
    fl_BD, fr_BD = neighbour_exchange_bidir_with_grad(a_BD, c_BD, left_rank=left, right_rank=right)
    ((seeded(700 + rank, B, D) * fl_BD).sum() + (seeded(800 + rank, B, D) * fr_BD).sum()).backward()
    return max(
        rel_err(fl_BD, seeded(600 + left, B, D)),  # left neighbour's to_right
        rel_err(fr_BD, seeded(500 + right, B, D)),  # right neighbour's to_left
        rel_err(a_BD.grad, seeded(800 + left, B, D)),  # a_r arrived on the left rank as its from_right
        rel_err(c_BD.grad, seeded(700 + right, B, D)),
    )


def check_size_mismatch(rank: int) -> float:
    x_BD = torch.zeros(B + (rank == 1), D, dtype=F64, requires_grad=True)
    try:
        all_gather_with_grad(x_BD)
    except ValueError as e:
        return 0.0 if "same tensor shape" in str(e) else 1.0
    return 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    info = init_distributed(device="cpu")
    rank, world = info.rank, info.world_size
    res: dict[str, float] = {}
    res["info"] = float(
        not (info.backend == "gloo" and info.device.type == "cpu" and world == dist.get_world_size() > 1)
    )
    res["objects"] = float(
        all_gather_object(rank * 10) != [q * 10 for q in range(world)]
        or broadcast_object(f"r{rank}", src=world - 1) != f"r{world - 1}"
    )
    res["gather"] = check_gather(rank, world)
    res["shift_1"] = check_shift(rank, world, 1)
    if world >= 3:  # step 2 on two ranks would be a send to oneself
        res["shift_2"] = check_shift(rank, world, 2)
        res["bidir"] = check_bidir(rank, world)
    res["size_mismatch"] = check_size_mismatch(rank)

    def clip() -> nn.Module:
        return ClipLoss(init_temperature=0.2)

    def siglip(ring: str) -> Callable[[], nn.Module]:
        # Bias -1 (not -10) keeps the bias/scale gradients far from zero, so errors there would show.
        return lambda: SigLipLoss(init_logit_scale=math.log(5.0), init_bias=-1.0, ring=ring)

    for ddp in (False, True):
        tag = "ddp" if ddp else "manual"
        res[f"clip_{tag}"] = check_loss(clip, ref_clip, rank, world, ddp, info)
        res[f"siglip_bidir_{tag}"] = check_loss(siglip("bidir"), ref_siglip, rank, world, ddp, info)
        res[f"siglip_shift_{tag}"] = check_loss(siglip("shift"), ref_siglip, rank, world, ddp, info)

    per_rank = all_gather_object(res)
    if rank == 0:
        merged = {k: max(r[k] for r in per_rank) for k in res}
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "errors": merged}, f, indent=1)
    cleanup()


if __name__ == "__main__":
    main()
