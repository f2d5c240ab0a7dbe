"""The Llip model: a ViT with K mixture tokens, a text tower with target and query projections, and the
per-token key/value projections that the text-conditioned pooling (:mod:`vlp_llip.xattn`) mixes.

Shape legend:
    B: batch, C/H/W (images only): channels/height/width, L: token length, K: mixture tokens,
    Wv/Wt: vision/text width, D: embedding dim, H: cross-attention heads, d: D / H.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp_core.config import ModelConfig
from vlp_core.models.text import build_text_tower
from vlp_core.models.vit import build_vision_tower
from vlp_llip.config import LlipConfig
from vlp_llip.xattn import fold_out_proj

__all__ = ["MixtureHead", "LlipModel", "check_model_config"]


class MixtureHead(nn.Module):
    """One key and one value projection per mixture token, an output projection, optional LayerNorms.

    Args:
        tokens: K.
        width: Vision width Wv (the mixture tokens' size).
        embed_dim: D.
        heads: H (divides D).
        use_norm: LayerNorm(D) on keys and values.
        keys: Build the key projection (only the text-conditioned variant uses keys).
        shared_init: Start the K key/value projections as copies of one draw and ``out_proj`` at the identity
            (``loss.head_init='shared'``), so that at step 0 the head is one projection of the attention-pooled
            tokens; the default draws each of them independently (the paper).
    """

    def __init__(self, *, tokens: int, width: int, embed_dim: int, heads: int, use_norm: bool, keys: bool,
                 shared_init: bool = False) -> None:
        super().__init__()
        self.heads = heads
        std = width**-0.5

        def draw() -> nn.Parameter:
            w = torch.randn(1 if shared_init else tokens, width, embed_dim) * std
            return nn.Parameter(w.expand(tokens, width, embed_dim).clone())

        self.k_proj = draw() if keys else None
        self.v_proj = draw()
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        if shared_init:
            nn.init.eye_(self.out_proj.weight)
        else:
            nn.init.normal_(self.out_proj.weight, std=embed_dim**-0.5)
        self.k_norm = nn.LayerNorm(embed_dim) if use_norm and keys else nn.Identity()
        self.v_norm = nn.LayerNorm(embed_dim) if use_norm else nn.Identity()

    def _split(self, x_BKD: torch.Tensor) -> torch.Tensor:
        B, K, D = x_BKD.shape
        return x_BKD.view(B, K, self.heads, D // self.heads).transpose(1, 2)

    def project_values(self, h_BKW: torch.Tensor) -> torch.Tensor:
        """Per-token value projections (after the optional norm), ``[B, K, D]``."""
        return self.v_norm(torch.einsum("bkw,kwd->bkd", h_BKW, self.v_proj))

    def keys(self, h_BKW: torch.Tensor) -> torch.Tensor:
        """Per-head keys ``[B, H, K, d]``."""
        if self.k_proj is None:
            raise ValueError("this mixture head has no key projection (only loss.variant='llip' builds one)")
        return self._split(self.k_norm(torch.einsum("bkw,kwd->bkd", h_BKW, self.k_proj)))

    def values(self, h_BKW: torch.Tensor) -> torch.Tensor:
        """Per-head values before the output projection ``[B, H, K, d]``."""
        return self._split(self.project_values(h_BKW))

    def folded_values(self, h_BKW: torch.Tensor) -> torch.Tensor:
        """Values with the output projection folded in, ``[B, H, K, D]`` (once per image)."""
        return fold_out_proj(self.values(h_BKW), self.out_proj.weight)


def check_model_config(model: ModelConfig, llip: LlipConfig) -> None:
    """Clear errors for settings Llip cannot use, naming the config keys."""
    v = model.vision
    if v.extra_tokens < 1:
        raise ValueError(f"Llip needs K >= 1 mixture tokens: set model.vision.extra_tokens (got {v.extra_tokens})")
    if v.class_token:
        raise ValueError("Llip's mixture tokens replace the class token: set model.vision.class_token=false")
    if v.pool == "token":
        raise ValueError("Llip pools its own mixture tokens: set model.vision.pool='none' (got 'token')")
    if model.embed_dim % llip.heads:
        raise ValueError(f"model.embed_dim {model.embed_dim} is not divisible by loss.heads {llip.heads}")


class LlipModel(nn.Module):
    """Image and text towers plus Llip's heads; the variant decides which heads exist.

    ``forward(batch)`` returns, for ``variant='llip'``: ``image_keys`` [B, H, K, d], ``image_values`` (folded)
    [B, H, K, D], ``text_query`` [B, H, d] and ``text_target`` [B, D] (not normalised). For the
    factorised variants: ``image_features`` [B, D] and ``text_features`` [B, D], as for SigLIP.
    """

    def __init__(
        self, model_cfg: ModelConfig, llip: LlipConfig, *, vocab_size: int, pad_id: int, eot_id: int | None = None,
        bos_id: int | None = None,
    ) -> None:
        super().__init__()
        llip.validate()
        check_model_config(model_cfg, llip)
        self.variant, self.tau, self.heads, self.chunk = llip.variant, llip.tau, llip.heads, llip.chunk
        self.visual = build_vision_tower(model_cfg.vision)
        self.text = build_text_tower(model_cfg.text, vocab_size=vocab_size, pad_id=pad_id, eot_id=eot_id,
                                     bos_id=bos_id)
        K, Wv, Wt, D = model_cfg.vision.extra_tokens, self.visual.width, self.text.width, model_cfg.embed_dim
        self.num_tokens, self.embed_dim = K, D
        trunk = self.visual.trunk
        if getattr(trunk, "reg_token", None) is not None and not model_cfg.vision.pretrained:
            # The mixture tokens: Llip's width**-0.5 unless loss.token_init_std says otherwise (the demo).
            std = Wv**-0.5 if llip.token_init_std is None else llip.token_init_std
            nn.init.normal_(trunk.reg_token, std=std)
        self.text_projection = nn.Linear(Wt, D, bias=False)  # the contrastive target
        nn.init.normal_(self.text_projection.weight, std=Wt**-0.5)
        self.q_proj: nn.Linear | None = None
        self.mixture: MixtureHead | None = None
        self.image_proj: nn.Linear | None = None
        self.mix_logits: nn.Parameter | None = None
        if self.variant == "llip":
            self.q_proj = nn.Linear(Wt, D, bias=False)  # the cross-attention query
            nn.init.normal_(self.q_proj.weight, std=Wt**-0.5)
            self.q_norm = nn.LayerNorm(D) if llip.use_norm else nn.Identity()
        if self.variant in ("llip", "avg", "learned_avg"):
            self.mixture = MixtureHead(tokens=K, width=Wv, embed_dim=D, heads=llip.heads,
                                       use_norm=llip.use_norm, keys=self.variant == "llip",
                                       shared_init=llip.head_init == "shared")
        if self.variant == "learned_avg":
            self.mix_logits = nn.Parameter(torch.zeros(llip.heads, K))
        if self.variant == "register":
            self.image_proj = nn.Linear(Wv, D, bias=False)
            nn.init.normal_(self.image_proj.weight, std=Wv**-0.5)

    # --- image side ----------------------------------------------------------------------------------
    def mixture_tokens(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """The K mixture-token outputs after the ViT's final norm, ``[B, K, Wv]``."""
        return self.visual(images_BCHW).prefix

    def image_keys_values(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys [B, H, K, d], folded values [B, H, K, D])`` of ``variant='llip'``."""
        assert self.mixture is not None
        h_BKW = self.mixture_tokens(images_BCHW)
        return self.mixture.keys(h_BKW), self.mixture.folded_values(h_BKW)

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """One image vector ``[B, D]`` (factorised variants only; Llip's depends on the caption)."""
        h_BKW = self.mixture_tokens(images_BCHW)
        if self.variant == "register":
            assert self.image_proj is not None
            return self.image_proj(h_BKW[:, 0])
        if self.mixture is None or self.variant == "llip":
            raise ValueError("variant 'llip' has no single image vector; score pairs with vlp_llip.LlipScorer")
        if self.variant == "avg":  # uniform weights: mean of the values, then the output projection
            return self.mixture.out_proj(self.mixture.project_values(h_BKW).mean(dim=1))
        assert self.mix_logits is not None
        a_HK = torch.softmax(self.mix_logits.to(torch.promote_types(self.mix_logits.dtype, torch.float32)), dim=-1)
        return torch.einsum("hk,bhke->be", a_HK.to(h_BKW.dtype), self.mixture.folded_values(h_BKW))

    # --- text side -----------------------------------------------------------------------------------
    def text_hidden(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """End-of-text hidden state before any projection, ``[B, Wt]``."""
        return self.text(tokens_BL).pooled

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Contrastive target ``[B, D]`` (not normalised)."""
        return self.text_projection(self.text_hidden(tokens_BL))

    def query_from_hidden(self, g_BW: torch.Tensor) -> torch.Tensor:
        """Cross-attention query ``[B, H, d]`` (after the optional LayerNorm)."""
        assert self.q_proj is not None
        q_BD = self.q_norm(self.q_proj(g_BW))
        return q_BD.view(q_BD.shape[0], self.heads, -1)

    def encode_text_pair(self, tokens_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(query [B, H, d], target [B, D])`` from one pass of the text tower."""
        g_BW = self.text_hidden(tokens_BL)
        return self.query_from_hidden(g_BW), self.text_projection(g_BW)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.variant != "llip":
            return {"image_features": self.encode_image(batch["images"]),
                    "text_features": self.encode_text(batch["tokens"])}
        keys_BHKd, values_BHKD = self.image_keys_values(batch["images"])
        query_BHd, target_BD = self.encode_text_pair(batch["tokens"])
        return {"image_keys": keys_BHKd, "image_values": values_BHKD, "text_query": query_BHd,
                "text_target": target_BD}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        if hasattr(self.text, "set_grad_checkpointing"):
            self.text.set_grad_checkpointing(enable)
