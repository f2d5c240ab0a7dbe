"""Evaluation scorer for Llip: every (image, caption) pair is scored with the image mixed by that caption.

There is no single image vector, so an image's state keeps its keys and folded values (``[H, K, d + D]``)
and ``score`` re-pools them for every caption, blockwise. A caption's state packs its query and its
normalised target (``[H*d + D]``). Zero-shot class states average the query over the templates and average
the normalised targets, then renormalise. Scale and bias are left out: they do not change any ranking.

Shape legend:
    N: items, C: classes, T: templates, L: tokens, H: heads, K: mixture tokens, d: D / H, D: embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.eval import EmbeddingScorer
from vlp_core.method import Scorer
from vlp_llip.model import LlipModel
from vlp_llip.xattn import conditioned_cosines

__all__ = ["LlipScorer", "build_scorer"]


class LlipScorer:
    """:class:`vlp_core.method.Scorer` for ``variant='llip'``.

    Args:
        model: The :class:`LlipModel`.
        block_elements: Bound on the elements of one scoring block's largest tensors (images x captions x
            (D + 2*H*K)): :meth:`score` cuts its inputs into blocks of at most this size.
        tau: Inference temperature (default: the training one).
    """

    def __init__(self, model: LlipModel, *, block_elements: int = 2**22, tau: float | None = None) -> None:
        if model.variant != "llip":
            raise ValueError(f"LlipScorer needs variant 'llip', the model is {model.variant!r}")
        self.model = model
        self.block_elements = block_elements
        self.tau = tau or model.tau
        self.heads = model.heads
        self.embed_dim = model.embed_dim

    def image_states(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Keys and folded values side by side: ``[N, H, K, d + D]`` (float32)."""
        keys_NHKd, values_NHKD = self.model.image_keys_values(images_BCHW)
        return torch.cat([keys_NHKd.float(), values_NHKD.float()], dim=-1)

    def _pack(self, query_NHd: torch.Tensor, target_ND: torch.Tensor) -> torch.Tensor:
        return torch.cat([query_NHd.float().flatten(1), F.normalize(target_ND.float(), dim=-1)], dim=1)

    def text_states(self, tokens_NL: torch.Tensor) -> torch.Tensor:
        """Query and normalised target side by side: ``[N, H*d + D]``."""
        return self._pack(*self.model.encode_text_pair(tokens_NL))

    def class_states(self, tokens_CTL: torch.Tensor) -> torch.Tensor:
        """Query averaged over templates; target: mean of the normalised targets, renormalised. ``[C, H*d + D]``."""
        C, T, L = tokens_CTL.shape
        query_CTHd, target_CTD = self.model.encode_text_pair(tokens_CTL.reshape(C * T, L))
        query_CHd = query_CTHd.float().view(C, T, self.heads, -1).mean(dim=1)
        target_CD = F.normalize(target_CTD.float(), dim=-1).view(C, T, -1).mean(dim=1)
        return self._pack(query_CHd, target_CD)

    def score(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """``cos(z[i | q_j], zt_j)`` for every image i and caption j: ``[Ni, Nt]``, blockwise."""
        D = self.embed_dim
        d = D // self.heads
        keys_NHKd, values_NHKD = image_states[..., :d], image_states[..., d:]
        query_NHd = text_states[:, :D].view(-1, self.heads, d)
        target_ND = text_states[:, D:]
        Ni, Nt = image_states.shape[0], text_states.shape[0]
        out = torch.empty(Ni, Nt, dtype=image_states.dtype, device=image_states.device)
        per_pair = D + 2 * self.heads * keys_NHKd.shape[2]  # the [., ., D] mix and two [., ., H, K] weights
        ct = max(1, min(Nt, 512, self.block_elements // per_pair))
        ci = max(1, self.block_elements // (ct * per_pair))
        for i0 in range(0, Ni, ci):
            for j0 in range(0, Nt, ct):
                out[i0:i0 + ci, j0:j0 + ct] = conditioned_cosines(
                    keys_NHKd[i0:i0 + ci], values_NHKD[i0:i0 + ci], query_NHd[j0:j0 + ct], target_ND[j0:j0 + ct],
                    self.tau)
        return out


def build_scorer(model: nn.Module) -> Scorer:
    """:class:`LlipScorer` for Llip, the core's embedding scorer for the factorised variants."""
    if isinstance(model, LlipModel) and model.variant == "llip":
        return LlipScorer(model)
    return EmbeddingScorer(model)
