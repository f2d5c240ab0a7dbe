"""A small, independent re-statement of the official Llip model (facebookresearch/Llip's ``CMP``), from the spec.

Plain torch, written from ``shared/specs/llip.md`` sections 1 and 2 with the official parameter names, so that
its ``state_dict()`` is the released checkpoints' layout: an OpenAI-style ViT (bias-free ``conv1``, ``ln_pre``,
``nn.MultiheadAttention`` blocks with QuickGELU MLPs, ``ln_post``) whose ``class_embedding`` holds the K
mixture tokens; a causal text transformer pooled at ``argmax(tokens)`` (EOT has the largest id); the
``xAttnPred`` head with per-token ``k_proj``/``v_proj`` [K, Wv, D], ``q_proj`` [Wt, D], optional
LayerNorm(D) on K/Q/V, scores ``<Q, K> / tau`` (no 1/sqrt(d)), softmax over the K tokens per head, then
``pred.out_proj`` applied to the concatenated heads (``z @ W``, not folded); and the sigmoid loss.

Shape legend: B images/captions, K mixture tokens, N patches, L context, Wv/Wt tower widths, D embedding dim,
H cross-attention heads, d = D / H, V/T images/captions of a score matrix.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """OpenAI's block on [L, B, W] (sequence first, as ``nn.MultiheadAttention`` defaults to)."""

    def __init__(self, width: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(mlp, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x_LBW: torch.Tensor, mask_LL: torch.Tensor | None) -> torch.Tensor:
        y = self.ln_1(x_LBW)
        x_LBW = x_LBW + self.attn(y, y, y, attn_mask=mask_LL, need_weights=False)[0]
        return x_LBW + self.mlp(self.ln_2(x_LBW))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp) for _ in range(layers))

    def forward(self, x_LBW: torch.Tensor, mask_LL: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x_LBW = block(x_LBW, mask_LL)
        return x_LBW


class VisualTransformer(nn.Module):
    """The official image tower with ``ncls = K``; returns the K mixture tokens after ``ln_post``."""

    def __init__(self, *, image_size: int, patch: int, width: int, layers: int, heads: int, mlp: int, K: int) -> None:
        super().__init__()
        self.K = K
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(K, width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(K + grid * grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x_BWN = self.conv1(images_BCHW).flatten(2)
        x_BNW = x_BWN.transpose(1, 2)
        tokens_BKW = self.class_embedding[None].expand(x_BNW.shape[0], -1, -1)
        x_BTW = torch.cat([tokens_BKW, x_BNW], dim=1) + self.positional_embedding
        x_BTW = self.ln_pre(x_BTW)
        x_BTW = self.transformer(x_BTW.transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x_BTW[:, :self.K])


class XAttnPred(nn.Module):
    def __init__(self, D: int) -> None:
        super().__init__()
        self.out_proj = nn.Parameter(D**-0.5 * torch.randn(D, D))


class OfficialLlip(nn.Module):
    """The official ``CMP`` model (top-level names as in the released state dicts)."""

    def __init__(self, *, K: int, image_size: int, patch: int, vision_width: int, vision_layers: int,
                 vision_heads: int, vision_mlp: int, vocab_size: int, context_length: int, text_width: int,
                 text_layers: int, text_heads: int, embed_dim: int, heads: int, use_norm: bool, tau: float) -> None:
        super().__init__()
        D, Wv, Wt = embed_dim, vision_width, text_width
        self.heads, self.tau = heads, tau
        self.visual = VisualTransformer(image_size=image_size, patch=patch, width=Wv, layers=vision_layers,
                                        heads=vision_heads, mlp=vision_mlp, K=K)
        self.transformer = Transformer(Wt, text_layers, text_heads, 4 * Wt)
        self.token_embedding = nn.Embedding(vocab_size, Wt)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, Wt))
        self.ln_final = nn.LayerNorm(Wt)
        self.text_projection = nn.Parameter(Wt**-0.5 * torch.randn(Wt, D))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-3.0))
        self.v_proj = nn.Parameter(Wv**-0.5 * torch.randn(K, Wv, D))
        self.k_proj = nn.Parameter(Wv**-0.5 * torch.randn(K, Wv, D))
        self.q_proj = nn.Parameter(Wt**-0.5 * torch.randn(Wt, D))
        norm = nn.LayerNorm if use_norm else (lambda _: nn.Identity())
        self.K_norm, self.Q_norm, self.V_norm = norm(D), norm(D), norm(D)
        self.pred = XAttnPred(D)

    def perturb(self, seed: int) -> None:
        """Move every LayerNorm and bias away from its default (a misplaced norm or bias would then show)."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias") or "ln_" in name or "_norm" in name:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))

    def _split(self, x_BKD: torch.Tensor) -> torch.Tensor:
        B, K, D = x_BKD.shape
        return x_BKD.view(B, K, self.heads, D // self.heads).permute(0, 2, 1, 3)  # [B, H, K, d]

    def encode_image(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(h [B, K, Wv], keys [B, H, K, d], values [B, H, K, d])``."""
        h_BKW = self.visual(images_BCHW)
        keys = self.K_norm(torch.einsum("bkw,kwd->bkd", h_BKW, self.k_proj))
        values = self.V_norm(torch.einsum("bkw,kwd->bkd", h_BKW, self.v_proj))
        return h_BKW, self._split(keys), self._split(values)

    def encode_text(self, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query [B, H, d], target [B, D])`` from the EOT state, EOT found as ``argmax(tokens)``."""
        L = tokens_BL.shape[1]
        mask_LL = torch.full((L, L), float("-inf")).triu_(1)
        x_BLW = self.token_embedding(tokens_BL) + self.positional_embedding
        x_BLW = self.ln_final(self.transformer(x_BLW.transpose(0, 1), mask_LL).transpose(0, 1))
        g_BW = x_BLW[torch.arange(x_BLW.shape[0]), tokens_BL.argmax(dim=-1)]
        q_BD = self.Q_norm(g_BW @ self.q_proj)
        return q_BD.view(q_BD.shape[0], self.heads, -1), g_BW @ self.text_projection

    def conditioned(self, keys_VHKd: torch.Tensor, values_VHKd: torch.Tensor, query_THd: torch.Tensor) -> torch.Tensor:
        """``z[v, t]`` [V, T, D]: mix per head, concatenate the heads, then ``@ out_proj``."""
        attn_VTHK = (torch.einsum("vhnd,thd->vthn", keys_VHKd, query_THd) / self.tau).softmax(-1)
        mixed = torch.einsum("vthn,vhnd->vthd", attn_VTHK, values_VHKd)
        return mixed.reshape(keys_VHKd.shape[0], query_THd.shape[0], -1) @ self.pred.out_proj

    def scores(self, images_BCHW: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
        """``cos(z[i | q_j], zt_j)`` for every image i and caption j."""
        _, keys, values = self.encode_image(images_BCHW)
        query, target = self.encode_text(tokens_BL)
        z_VTD = F.normalize(self.conditioned(keys, values, query), dim=-1)
        return (z_VTD * F.normalize(target, dim=-1)[None]).sum(-1)

    def loss(self, images_BCHW: torch.Tensor, tokens_BL: torch.Tensor) -> torch.Tensor:
        """``-(1/B) sum_ij log sigmoid(y_ij (exp(scale) cos_ij + bias))``, ``y = 2I - 1``."""
        logits = self.logit_scale.exp() * self.scores(images_BCHW, tokens_BL) + self.logit_bias
        labels = 2 * torch.eye(logits.shape[0]) - 1
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]
