"""An independent float64 reference of ALIP's step (spec 3.1-4.1, written as plainly as possible), shared
by the unit tests and the torchrun worker.

Plain Python loops over samples for the gates and the per-sample losses, the full N x N logits, no
collectives, no code from ``vlp_alip``.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(F64)
    return x / x.norm(dim=1, keepdim=True)


def ref_gates(s_tc, s_xt, s_xc, h_tc, h_xt, h_xc, gamma_s=2.0, gamma_p=2.0, use=(True, True, True)):
    """Lists of W^s, W^t, W^c by eq. 2 and 4 (the code's strict ``S_tc < H_tc``)."""
    ws, wt, wc = [], [], []
    for a, b, c in zip(s_tc, s_xt, s_xc):
        low = a < h_tc
        ws.append(math.exp(gamma_s * (a - h_tc)) if low and use[0] else 1.0)
        wt.append(math.exp(gamma_p * (b - h_xt)) if low and use[1] else 1.0)
        wc.append(math.exp(gamma_p * (c - h_xc)) if low and use[2] else 1.0)
    return ws, wt, wc


def ref_per_sample(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample symmetric InfoNCE, 0.5 (CE_i(x->y) + CE_i(y->x)), from the full N x N logits."""
    logits = scale * x @ y.T
    out = []
    for i in range(len(x)):
        row = -logits[i, i] + torch.logsumexp(logits[i, :], dim=0)
        col = -logits[i, i] + torch.logsumexp(logits[:, i], dim=0)
        out.append(0.5 * (row + col))
    return out


def ref_alip(x, t, c, logit_scale, h, *, m=0.99, gamma_s=2.0, gamma_p=2.0, use=(True, True, True)):
    """Returns (loss, new H triple, (ws, wt, wc)) for one step on the whole batch; weights are constants."""
    x, t, c = unit(x), unit(t), unit(c)
    xd, td, cd = x.detach(), t.detach(), c.detach()
    s_tc = [float(td[i] @ cd[i]) for i in range(len(x))]
    s_xt = [float(xd[i] @ td[i]) for i in range(len(x))]
    s_xc = [float(xd[i] @ cd[i]) for i in range(len(x))]
    h_new = tuple(m * hv + (1 - m) * sum(s) / len(s) for hv, s in zip(h, (s_tc, s_xt, s_xc)))
    ws, wt, wc = ref_gates(s_tc, s_xt, s_xc, *h_new, gamma_s=gamma_s, gamma_p=gamma_p, use=use)
    scale = logit_scale.to(F64).exp()
    per_xt, per_xc = ref_per_sample(x, t, scale), ref_per_sample(x, c, scale)
    n = len(x)
    loss_xt = sum(ws[i] * wt[i] * per_xt[i] for i in range(n)) / n
    loss_xc = sum(ws[i] * wc[i] * per_xc[i] for i in range(n)) / n
    return loss_xt + loss_xc, h_new, (ws, wt, wc)
