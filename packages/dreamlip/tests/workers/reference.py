"""Plain-loop float64 references for the DreamLIP losses, and the seeded inputs shared with the dist worker.

Written from the formulas (spec §2.1, §2.2), one scalar at a time, sharing no code with ``vlp_dreamlip``.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


def _log_softmax_at(logits: list[float], i: int) -> float:
    m = max(logits)
    return logits[i] - m - math.log(sum(math.exp(v - m) for v in logits))


def ref_multi_positive(img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> float:
    """1/T sum_j 1/2 [mean_i -log softmax_k(s v_i.t_kj)_i + mean_i -log softmax_n(s t_ij.v_n)_i]."""
    g, t = txt.shape[:2]
    s = math.exp(logit_scale)
    v = [_unit(img[i]) for i in range(g)]
    tt = [[_unit(txt[i, j]) for j in range(t)] for i in range(g)]
    total = 0.0
    for j in range(t):
        i2t = -sum(_log_softmax_at([s * float(v[i] @ tt[k][j]) for k in range(g)], i) for i in range(g)) / g
        t2i = -sum(_log_softmax_at([s * float(tt[i][j] @ v[n]) for n in range(g)], i) for i in range(g)) / g
        total += (i2t + t2i) / 2
    return total / t


def ref_grouped(txt: torch.Tensor, patches: torch.Tensor, sigma: float) -> list[list[torch.Tensor]]:
    """g[i][j]: patches of image i pooled with text (i, j)'s thresholded min-max weights, normalised."""
    g, t = txt.shape[:2]
    out = []
    for i in range(g):
        p = [_unit(patches[i, n]) for n in range(patches.shape[1])]
        row = []
        for j in range(t):
            q = _unit(txt[i, j])
            a = [float(q @ pn) for pn in p]
            lo, hi = min(a), max(a)
            w = [(x - lo) / (hi - lo + 1e-10) for x in a]
            w = [x if x >= sigma else 0.0 for x in w]
            z = sum(w)
            acc = sum((wn / z) * pn for wn, pn in zip(w, p))
            row.append(_unit(acc))
        out.append(row)
    return out


def ref_grouping_loss(txt: torch.Tensor, patches: torch.Tensor, logit_scale: float, *, sigma: float = 0.0,
                      negatives: str = "image", keep: list[list[int]] | None = None) -> float:
    """SGL over the texts ``keep[i]`` of each image i (default all): per-image mean, then mean over images.

    "image": text (i, j) against g[i][k] for k in keep[i]. "global": (text->g + g->text) / 2 against every
    kept (image, slot) of the batch.
    """
    g, t = txt.shape[:2]
    keep = keep or [list(range(t)) for _ in range(g)]
    s = math.exp(logit_scale)
    gg = ref_grouped(txt, patches, sigma)
    tt = [[_unit(txt[i, j]) for j in range(t)] for i in range(g)]
    every = [(i, j) for i in range(g) for j in keep[i]]
    total = 0.0
    for i in range(g):
        per = 0.0
        for j in keep[i]:
            if negatives == "image":
                logits = [s * float(tt[i][j] @ gg[i][k]) for k in keep[i]]
                per -= _log_softmax_at(logits, keep[i].index(j))
            else:
                pos = every.index((i, j))
                t2g = [s * float(tt[i][j] @ gg[a][c]) for a, c in every]
                g2t = [s * float(gg[i][j] @ tt[a][c]) for a, c in every]
                per -= (_log_softmax_at(t2g, pos) + _log_softmax_at(g2t, pos)) / 2
        total += per / len(keep[i])
    return total / g


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# Shared by the distributed worker and the single-process side of the test.
G, T, N, D, DI, DT = 6, 4, 5, 7, 9, 8  # global batch 6 = 2 ranks x 3 (non-square per-rank logits)


def dist_inputs() -> dict[str, torch.Tensor]:
    """Tower inputs of the global batch, and duplicate ids with repeats in two images."""
    ids = torch.arange(T).repeat(G, 1)
    ids[1, 3] = 1  # image 1: slot 3 repeats slot 1
    ids[4, 2], ids[4, 3] = 0, 0  # image 4: slots 2 and 3 repeat the raw caption
    return {"x_img": seeded(1, G, DI), "x_patch": seeded(2, G, N, DI), "x_txt": seeded(3, G, T, DT),
            "caption_ids": ids}


class Towers(torch.nn.Module):
    """Linear image head (shared by pooled and patch inputs, like the model), linear text tower, the loss."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        torch.manual_seed(1234)  # identical init on every rank and in the single process
        self.img = torch.nn.Linear(DI, D, bias=False).to(F64)
        self.txt = torch.nn.Linear(DT, D).to(F64)
        self.loss = loss.to(F64)

    def forward(self, x_img, x_patch, x_txt, caption_ids):
        feats = {"image_features": self.img(x_img), "patch_features": self.img(x_patch),
                 "text_features": self.txt(x_txt)}
        return self.loss(feats, {"caption_ids": caption_ids}).loss


# name -> DreamLipConfig overrides checked under torchrun
DIST_CHECKS = {
    "sgl_image": {},
    "sgl_global": {"sgl_negatives": "global"},
    "sgl_global_unmasked": {"sgl_negatives": "global", "mask_duplicates": False},
    "mpcl_only": {"sgl_weight": 0.0},
}


def make_loss(name: str):
    from vlp_dreamlip.config import DreamLipConfig
    from vlp_dreamlip.loss import DreamLipLoss

    return DreamLipLoss(DreamLipConfig(num_subcaptions=T - 1, init_temperature=0.3, sgl_init_temperature=0.2,
                                       sgl_sigma=0.3, mpcl_weight=0.8, **DIST_CHECKS[name]))
