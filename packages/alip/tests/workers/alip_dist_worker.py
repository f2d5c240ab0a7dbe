"""torchrun worker: ALIP's loss under data parallelism vs the single-process float64 reference.

Every rank builds the same seeded global batch and a tiny model (an image tower and ONE text tower shared by
raw texts and captions, plus the loss module), takes its 1/W share of the rows and runs two training-like
steps (H carries over from the first to the second). Gradients are averaged over ranks by hand and through
real DDP. Rank 0 writes ``{check: max relative error over ranks}`` and the raw step values to ``--out``.

Tensor-name legend:
    b: per-rank batch, W: world size, N = W*b: global batch, D: embedding dim, DI/DT: tower input dims.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vlp_alip import AlipConfig, AlipLoss  # noqa: E402
from vlp_alip_testutils import F64, ref_alip  # noqa: E402

from vlp_core.distributed import all_gather_object, all_reduce_sum, cleanup, init_distributed, wrap_ddp  # noqa: E402

N, D, DI, DT = 6, 5, 7, 6  # global batch fixed: 1 process and 2 processes see the same rows
CFG = dict(init_temperature=0.2, momentum=0.8, h_init=0.5)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = (torch.as_tensor(v, dtype=F64).detach() for v in (a, b))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1234)  # identical init on every rank and in the reference
        self.img = nn.Linear(DI, D).to(F64)
        self.txt = nn.Linear(DT, D).to(F64)
        self.loss = AlipLoss(AlipConfig(**CFG)).to(F64)
        self.parts: dict = {}

    def features(self, xi, xt, xc):
        t2 = self.txt(torch.cat([xt, xc]))  # one pass of the shared text tower over both texts
        t, c = t2.split(len(xt))
        return self.img(xi), t, c

    def forward(self, xi, xt, xc, noisy):
        x, t, c = self.features(xi, xt, xc)
        out = self.loss({"image_features": x, "text_features": t, "caption_features": c}, {"raw_is_noisy": noisy})
        self.parts = out.parts
        return out.loss


def batch(step: int, n: int):
    xt = seeded(10 * step + 2, n, DT)
    return (seeded(10 * step + 1, n, DI), xt, xt + 0.7 * seeded(10 * step + 3, n, DT),
            torch.arange(n) % 3 == 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    rank, world = info.rank, info.world_size
    n, b = N, N // world
    rows = slice(rank * b, (rank + 1) * b)
    errors: dict[str, float] = {}
    values: dict[str, list] = {}

    for ddp in (False, True):
        tag = "ddp" if ddp else "manual"
        ref, model = Towers(), Towers()
        net = wrap_ddp(model, info) if ddp else model
        h = (CFG["h_init"],) * 3
        for step in (1, 2):
            xi, xt, xc, noisy = batch(step, n)
            # reference: whole global batch in this one process, plain loops, weights as constants
            ref.zero_grad()
            want, h, (ws, wt, wc) = ref_alip(*ref.features(xi, xt, xc), ref.loss.logit_scale, h, m=CFG["momentum"])
            want.backward()
            model.zero_grad()
            loss = net(xi[rows], xt[rows], xc[rows], noisy[rows])
            loss.backward()
            model.loss.after_step(torch.tensor(True))  # what the trainer calls after the optimizer step
            if not ddp:
                for p in model.parameters():
                    all_reduce_sum(p.grad).div_(world)
            mean_loss = all_reduce_sum(loss.detach().clone()) / world
            errs = [rel_err(mean_loss, want)]
            errs += [rel_err(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())]
            errs += [rel_err(model.loss.h_tc, h[0]), rel_err(model.loss.h_xt, h[1]), rel_err(model.loss.h_xc, h[2])]
            errs += [rel_err(model.parts["gate_ws_mean"], sum(ws) / n),
                     rel_err(model.parts["gate_wt_mean"], sum(wt) / n),
                     rel_err(model.parts["gate_wc_mean"], sum(wc) / n)]
            nz = noisy.tolist()
            errs.append(rel_err(model.parts["gate_ws_noisy"], sum(w for w, z in zip(ws, nz) if z) / sum(nz)))
            errors[f"{tag}_step{step}"] = max(errs)
            errors[f"{tag}_step{step}_both_branches"] = float(not 0 < sum(w < 1 for w in ws) < n)
            values[f"{tag}_step{step}"] = [float(mean_loss)] + torch.cat(
                [p.grad.flatten() for p in model.parameters()]).tolist()

    per_rank = all_gather_object(errors)
    if rank == 0:
        merged = {k: max(r[k] for r in per_rank) for k in errors}
        with open(args.out, "w") as f:
            json.dump({"world_size": world, "errors": merged, "values": values}, f, indent=1)
    cleanup()


if __name__ == "__main__":
    main()
