"""Independent float64 reference for Llip: every (image, caption) pair scored explicitly in Python loops.

Works on the raw parameter tensors (per-token key/value matrices, query/target/output projections), with the
output projection applied the direct way (mix per head, concatenate, project), a hand-written LayerNorm and
``-log(sigmoid(y * s))`` written out. Shared by the single-process tests and the torchrun worker.

Shape legend: N images/captions, K mixture tokens, Wv/Wt tower widths, D embedding dim, H heads.
"""

from __future__ import annotations

import math

import torch


def layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    if not isinstance(norm, torch.nn.LayerNorm):
        return x
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def reference_score(model, h_KW: torch.Tensor, g_W: torch.Tensor, tau: float) -> torch.Tensor:
    """cos(z[image | caption], target(caption)) for one image's tokens ``h_KW`` and one caption's ``g_W``."""
    head = model.mixture
    K = h_KW.shape[0]
    H = model.heads
    keys = torch.stack([layer_norm(h_KW[k] @ head.k_proj[k], head.k_norm) for k in range(K)])  # [K, D]
    values = torch.stack([layer_norm(h_KW[k] @ head.v_proj[k], head.v_norm) for k in range(K)])
    q = layer_norm(g_W @ model.q_proj.weight.T, model.q_norm)
    D = q.shape[0]
    d = D // H
    mixed = []
    for hh in range(H):
        sl = slice(hh * d, (hh + 1) * d)
        logits = torch.stack([(keys[k, sl] * q[sl]).sum() / tau for k in range(K)])
        w = torch.exp(logits - logits.max())
        w = w / w.sum()
        mixed.append(sum(w[k] * values[k, sl] for k in range(K)))
    z = torch.cat(mixed) @ head.out_proj.weight.T
    t = g_W @ model.text_projection.weight.T
    return (z @ t) / (z.norm() * t.norm())


def reference_loss(model, h_NKW: torch.Tensor, g_NW: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: torch.Tensor, tau: float) -> torch.Tensor:
    """``-(1/N) sum_{i,j} log sigmoid(y_ij s(i, j))`` with ``s = exp(scale) cos + bias``, pair by pair."""
    N = h_NKW.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(N):
        for j in range(N):
            s = logit_scale.exp() * reference_score(model, h_NKW[i], g_NW[j], tau) + logit_bias
            y = 1.0 if i == j else -1.0
            total = total - torch.log(1 / (1 + torch.exp(-y * s)))
    return total / N


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float, what: str, atol: float = 1e-12) -> None:
    """max |a - b| <= tol * max |b|, or <= atol (gradients that are exactly zero in exact arithmetic, e.g. of
    the key LayerNorm's bias, which shifts every key's score by the same amount)."""
    a, b = a.detach().double(), b.detach().double()
    diff = float((a - b).abs().max())
    err = diff / max(float(b.abs().max()), 1e-30)
    assert (err <= tol or diff <= atol) and not math.isnan(err), f"{what}: relative error {err:.3g} > {tol}"
