"""The LCL model: ViT -> attentive pooling/projection -> causal LM with the image tokens spliced in.

Shape legend:
    N: images of the batch (in span order), M: most images in a row, P: patch tokens per image, Dv: ViT
    width, D: LM width (= the pooling output and the embedding width), B: sequences, L: sequence length,
    V: vocabulary (tokenizer + 3 image-span tokens), T: generation targets of the batch.

The image latent (attention-pooled) and the per-patch LM input tokens share the value and output
projections, so the latent is a per-head attention-weighted mixture of the tokens the LM reads.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp_core.config import RunConfig
from vlp_core.models.text import CausalTextTransformer, build_text_tower
from vlp_core.models.vit import build_vision_tower
from vlp_lcl.data import SpecialIds

__all__ = ["AttentivePoolingProjection", "CoreCausalLM", "HFCausalLM", "LclModel", "chunked_nll_sum",
           "flat_indices"]


class AttentivePoolingProjection(nn.Module):
    """One learned query cross-attending to the patches; pooled latent and per-patch tokens share V and out.

    ``pooled = proj(MHA(LN_q(q0), LN_k(X), LN_v(X)))``, ``tokens = proj(W_v LN_v(X) + b_v)``.
    """

    def __init__(self, in_dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        if out_dim % heads:
            raise ValueError(f"attentive pooling: width {out_dim} is not divisible by loss.pool_heads {heads}")
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, in_dim))
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(in_dim), nn.LayerNorm(in_dim), nn.LayerNorm(in_dim)
        self.q = nn.Linear(in_dim, out_dim, bias=False)
        self.k = nn.Linear(in_dim, out_dim, bias=False)
        self.v = nn.Linear(in_dim, out_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(out_dim))
        self.k_bias = nn.Parameter(torch.zeros(out_dim))
        self.v_bias = nn.Parameter(torch.zeros(out_dim))
        self.proj = nn.Linear(out_dim, out_dim, bias=False)

    def forward(self, x_NPDv: Tensor) -> tuple[Tensor, Tensor]:
        """Patch tokens [N, P, Dv] -> (pooled [N, D], tokens [N, P, D])."""
        N, P, _ = x_NPDv.shape
        H = self.heads
        q_1D = F.linear(self.norm_q(self.query), self.q.weight, self.q_bias)
        k_NPD = F.linear(self.norm_k(x_NPDv), self.k.weight, self.k_bias)
        v_NPD = F.linear(self.norm_v(x_NPDv), self.v.weight, self.v_bias)
        D = v_NPD.shape[-1]
        q_NH1h = q_1D.view(1, H, 1, D // H).expand(N, H, 1, D // H)
        k_NHPh = k_NPD.view(N, P, H, D // H).transpose(1, 2)
        v_NHPh = v_NPD.view(N, P, H, D // H).transpose(1, 2)
        pooled_ND = F.scaled_dot_product_attention(q_NH1h, k_NHPh, v_NHPh).reshape(N, D)
        return self.proj(pooled_ND), self.proj(v_NPD)


class CoreCausalLM(nn.Module):
    """The core's CLIP-style causal transformer as a decoder: ``hidden`` is the stream before ``ln_final``."""

    def __init__(self, tower: CausalTextTransformer) -> None:
        super().__init__()
        self.tower = tower
        self.width = tower.width
        self.context_length = tower.context_length

    def embed(self, ids_BL: Tensor) -> Tensor:
        return self.tower.embed_tokens(ids_BL)

    def hidden(self, x_BLD: Tensor) -> Tensor:
        return self.tower.forward_embeds(x_BLD, final_norm=False)

    def final_norm(self, h_ND: Tensor) -> Tensor:
        return self.tower.ln_final(h_ND)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)


class HFCausalLM(nn.Module):
    """Any ``transformers`` decoder (GPT-2, Llama, ...) driven through ``inputs_embeds``.

    Its embedding table is grown to ``vocab_size`` (the three image-span tokens); its own final norm is
    already inside ``last_hidden_state``, so ``final_norm`` is the identity. No attention mask is needed:
    padding sits after the real tokens of every row and a causal model cannot see it from them.
    """

    def __init__(self, name_or_path: str, *, vocab_size: int, random_init: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(name_or_path)
            model = AutoModel.from_config(config) if random_init else AutoModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ValueError(f"model.text.hf_name {name_or_path!r} could not be loaded: {e}") from None
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"model.text.hf_name {name_or_path!r} is an encoder-decoder; LCL needs a decoder")
        current = model.get_input_embeddings().weight.shape[0]
        if vocab_size > current:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
        self.model = model
        self.width = int(model.get_input_embeddings().weight.shape[1])
        config = model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 0)
                                  or getattr(config, "n_positions", 0) or 1 << 30)

    def embed(self, ids_BL: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids_BL)

    def hidden(self, x_BLD: Tensor) -> Tensor:
        if x_BLD.shape[1] > self.context_length:
            raise ValueError(f"sequence of length {x_BLD.shape[1]} exceeds the LM's {self.context_length}")
        return self.model(inputs_embeds=x_BLD, use_cache=False).last_hidden_state

    def final_norm(self, h_ND: Tensor) -> Tensor:
        return h_ND

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()


def _chunk_nll(head: nn.Module, h_TD: Tensor, target_T: Tensor) -> Tensor:
    logits_TV = head(h_TD)  # at least float32 (half-precision logits under autocast lose the small terms)
    return F.cross_entropy(logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32)), target_T,
                           reduction="sum")


def chunked_nll_sum(head: nn.Module, hidden_TD: Tensor, target_T: Tensor, chunk: int) -> Tensor:
    """Summed next-token cross entropy of ``head`` over target rows, ``chunk`` rows at a time.

    Each chunk is checkpointed: its [chunk, V] logits are recomputed in the backward pass, so at most one
    chunk's logits exist at any time (never the [T, V] matrix).
    """
    total = hidden_TD.new_zeros((), dtype=torch.promote_types(hidden_TD.dtype, torch.float32))
    for start in range(0, target_T.shape[0], chunk):
        h, t = hidden_TD[start : start + chunk], target_T[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_nll, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, h, t)
    return total


def flat_indices(soi_pos: list[list[int]], gen_pos: list[list[int]], *, images_per_row: int, row_length: int,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices of the images (rows of [B*M]), the <soi> positions and the targets (rows of [B*L]).

    Row b holds ``len(soi_pos[b])`` images (its first ones of M) and targets at ``gen_pos[b]``. Built on the
    host from the batch's lists: one host-to-device copy each, no synchronisation.
    """
    image_N = [b * images_per_row + m for b, row in enumerate(soi_pos) for m in range(len(row))]
    soi_N = [b * row_length + t for b, row in enumerate(soi_pos) for t in row]
    gen_T = [b * row_length + t for b, row in enumerate(gen_pos) for t in row]
    image_N_, soi_N_, gen_T_ = (torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)
                                for x in (image_N, soi_N, gen_T))
    return image_N_, soi_N_, gen_T_


class LclModel(nn.Module):
    """``forward(batch)`` returns the contrastive pair features and the summed generation loss; see module doc.

    Args:
        cfg: Run config; ``cfg.model.embed_dim`` must equal the LM width (the latent is compared with the
            projected LM state and its per-patch tokens are the LM's input embeddings).
        tokenizer: The vlp_core tokenizer (its vocabulary and special ids).
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any) -> None:
        super().__init__()
        self.ids = SpecialIds.for_tokenizer(tokenizer)
        self.gen_chunk = cfg.loss.gen_chunk
        self.visual = build_vision_tower(cfg.model.vision)
        text = cfg.model.text
        vocab = self.ids.vocab_size
        if text.kind == "hf":
            self.lm: CoreCausalLM | HFCausalLM = HFCausalLM(text.hf_name, vocab_size=vocab,
                                                            random_init=cfg.loss.hf_random_init)
        else:
            if not text.causal:
                raise ValueError("LCL's language model must be causal: set model.text.causal=true")
            tower = build_text_tower(text, vocab_size=vocab, pad_id=self.ids.pad, eot_id=self.ids.eot,
                                     bos_id=self.ids.bos)
            assert isinstance(tower, CausalTextTransformer)
            self.lm = CoreCausalLM(tower)
        D = self.lm.width
        if cfg.model.embed_dim != D:
            raise ValueError(f"model.embed_dim ({cfg.model.embed_dim}) must equal the LM width ({D}): the image "
                             "latent is compared with the projected LM state at <soi>")
        self.num_image_tokens = self.visual.num_patches
        self.pool = AttentivePoolingProjection(self.visual.width, D, cfg.loss.pool_heads)
        self.text_projection = nn.Parameter(torch.randn(D, D) * D**-0.5)
        self.lm_head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, vocab, bias=False))

    # -- parts ---------------------------------------------------------------------------------------------

    def encode_patches(self, images_NCHW: Tensor) -> tuple[Tensor, Tensor]:
        """(image latent [N, D], per-patch LM tokens [N, P, D]); the ViT's class token is dropped."""
        return self.pool(self.visual(images_NCHW).patches)

    def interleave(self, ids_BL: Tensor, tokens_NPD: Tensor) -> Tensor:
        """Token embeddings with the visual tokens written into the ``<img>`` slots in row-major order."""
        x_BLD = self.lm.embed(ids_BL)
        slots_BL1 = (ids_BL == self.ids.img).unsqueeze(-1).expand_as(x_BLD)
        return x_BLD.masked_scatter(slots_BL1, tokens_NPD.to(x_BLD.dtype))

    def context_features(self, hidden_ND: Tensor) -> Tensor:
        """LM states at ``<soi>`` -> final norm -> projection (unnormalised) [N, D]."""
        return self.lm.final_norm(hidden_ND) @ self.text_projection.to(hidden_ND.dtype)

    # -- evaluation ----------------------------------------------------------------------------------------

    def encode_image(self, images_BCHW: Tensor) -> Tensor:
        return self.encode_patches(images_BCHW)[0]

    def encode_text(self, tokens_BL: Tensor) -> Tensor:
        """Rows ``[BOS] text [EOT] pad..``: EOT becomes ``<soi>`` (on a copy); the feature is taken there."""
        is_eot_BL = tokens_BL == self.ids.eot
        if self.ids.bos is not None and self.ids.bos == self.ids.eot:
            is_eot_BL[:, 0] = False
        L = tokens_BL.shape[1]
        has_eot_B = is_eot_BL.any(dim=1)
        pos_B = torch.where(has_eot_B, is_eot_BL.int().argmax(dim=1), torch.full_like(has_eot_B, L - 1).long())
        rows_B = torch.arange(tokens_BL.shape[0], device=tokens_BL.device)
        # Evaluation only: one host read to drop the columns after the last <soi> (causal: they never matter).
        ids_BL = tokens_BL[:, : int(pos_B.max()) + 1].clone()
        ids_BL[rows_B, pos_B] = self.ids.soi
        hidden_BLD = self.lm.hidden(self.lm.embed(ids_BL))
        return self.context_features(hidden_BLD[rows_B, pos_B])

    # -- training ------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Features of a row-major batch (see :mod:`vlp_lcl.data`): per image ``image_latent`` [N, D],
        ``context`` [N, D] and ``has_context`` [N]; per batch the 0-dim sums ``gen_nll_sum`` and ``gen_tokens``.

        Batch-first features and 0-dim per-batch sums: the features of row slices merge into the whole batch's
        (concatenated / added), as exact accumulation needs (:mod:`vlp_core.train.accumulate`).
        """
        ids_BL, images_BM = batch["tokens"], batch["images"]
        image_N, soi_N, gen_T = flat_indices(batch["soi_pos"], batch["gen_pos"], images_per_row=images_BM.shape[1],
                                             row_length=ids_BL.shape[1], device=ids_BL.device)
        latent_ND, tokens_NPD = self.encode_patches(images_BM.flatten(0, 1)[image_N])
        hidden_BLD = self.lm.hidden(self.interleave(ids_BL, tokens_NPD))
        hidden_flat = hidden_BLD.flatten(0, 1)
        context_ND = self.context_features(hidden_flat[soi_N])
        nll = chunked_nll_sum(self.lm_head, hidden_flat[gen_T], batch["labels"].flatten()[gen_T], self.gen_chunk)
        return {
            "image_latent": latent_ND, "context": context_ND, "has_context": batch["has_context"].flatten()[image_N],
            "gen_nll_sum": nll, "gen_tokens": torch.tensor(float(gen_T.shape[0]), dtype=nll.dtype, device=nll.device),
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.lm.set_grad_checkpointing(enable)
