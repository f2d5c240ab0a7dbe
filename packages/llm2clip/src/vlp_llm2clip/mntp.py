"""Optional stage 1a: LLM2Vec's masked next-token prediction (MNTP) with bidirectional attention.

A fraction ``p`` of the content tokens (not BOS/EOT/padding) is selected; of those 80% become the mask token
(``[MASK]`` if the tokenizer has one, else ``"_"``, LLM2Vec's "blank" choice for Llama), 10% a random token, 10%
stay. The logit at position t-1 predicts the original token t (the causal LM head, shifted labels):
``L = -mean_{t in M} log softmax(W h_{t-1})[x_t]`` over this rank's selected tokens.

Exact accumulation (``train.accum_steps`` > 1): the model returns this rank's per-batch sums, the
cross-entropy summed over the selected tokens and their count, as 0-dim tensors; the core adds them over the
chunks, so the loss is normalised over the whole step's selected tokens (as with one batch), not per chunk,
and only two numbers per chunk are cached (no M x V logits).

Memory: rows are cut to the batch's longest (not padded to the context length); the LM head runs only on the
hidden states that predict a selected token (M x V logits, about ``p`` of B x L x V); the text model's weights
are in ``loss.llm_dtype``; ``train.grad_checkpointing`` checkpoints every decoder layer.

Legend: B batch, L length, V vocabulary, D hidden size, M selected (masked) positions of the batch.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.data.adapters import read_caption
from vlp_core.distributed.utils import all_reduce_sum, get_world_size
from vlp_core.method import LossOutput
from vlp_llm2clip.encoder import (
    decoder_layers,
    dtype_kwargs,
    hidden_states,
    masks_from_tokens,
    set_layer_checkpointing,
    trim_rows,
)

__all__ = ["MntpModel", "MntpLoss", "MntpAdapter", "mask_token_id"]

IGNORE = -100


def mask_token_id(tokenizer: Any) -> int:
    backend = getattr(tokenizer, "_backend", None)  # the core Tokenizer's rust tokenizer, when it has one
    for name in ("[MASK]", "<mask>"):
        found = backend.token_to_id(name) if backend is not None else None
        if found is not None:
            return int(found)
    ids = tokenizer.encode("_")
    if not ids:
        raise ValueError("the tokenizer has no mask token and cannot encode '_' for MNTP")
    return int(ids[0])


class MntpAdapter:
    """One caption per sample (a random one of ``short_key``/``long_key``, or ``txt`` for text-only samples)
    -> ``{"tokens", "attention", "labels"}`` with the selection drawn from the sample's seed."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.mask_id = mask_token_id(tokenizer)
        self.special = {tokenizer.bos_id, tokenizer.eot_id, tokenizer.pad_id}

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        rng = random.Random(sample.get("__seed__", 0))
        has_image = any(k in sample for k in ("jpg", "jpeg", "png", "webp"))
        key = rng.choice([self.cfg.short_key, self.cfg.long_key]) if has_image else "txt"
        ids = self.tokenizer([read_caption(sample, key, rng)])[0]
        labels = torch.full_like(ids, IGNORE)
        attention = masks_from_tokens(ids[None], bos_id=self.tokenizer.bos_id, eot_id=self.tokenizer.eot_id,
                                      pool_bos=True)[0][0]
        n_real = int(attention.sum())
        for t in range(n_real):
            if int(ids[t]) in self.special or rng.random() >= self.cfg.mntp_probability:
                continue
            labels[t] = ids[t]
            r = rng.random()
            if r < 0.8:
                ids[t] = self.mask_id
            elif r < 0.9:
                ids[t] = rng.randrange(self.tokenizer.vocab_size)
        return {"tokens": ids, "attention": attention, "labels": labels, "texts": ""}

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows stacked and cut to the batch's longest."""
        return trim_rows({k: torch.stack([s[k] for s in samples]) for k in ("tokens", "attention", "labels")})


class MntpModel(nn.Module):
    """A causal-LM (``AutoModelForCausalLM``) whose inner model runs bidirectionally; LoRA optional.

    ``forward`` returns ``{"nll_sum", "selected"}``: 0-dim sums over the batch (the float32 cross-entropy
    of the selected tokens and their count), from :meth:`selected_logits`, where only the positions that
    predict a selected token go through the LM head.
    """

    def __init__(self, cfg: Any, *, from_config: bool = False, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        from vlp_llm2clip.model import resolve_text_model

        folder = resolve_text_model(cfg.text_model)
        kwargs: dict[str, Any] = {"attn_implementation": "sdpa", **dtype_kwargs(dtype)}
        if from_config:
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), **kwargs)
        else:
            lm = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        for m in lm.modules():
            if getattr(m, "is_causal", False):
                m.is_causal = False
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            from vlp_llm2clip.caption_model import lora_targets

            lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                               bias="none", target_modules=lora_targets(cfg, lm.config.model_type)))
        self.lm = lm

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers (the core's FSDP2 shards each one)."""
        return decoder_layers(self.lm)

    def causal_lm(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def selected_logits(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"logits": [M, V] float32, "labels": [M]}`` at the positions that predict a selected token."""
        lm = self.causal_lm()
        hidden_BLD = hidden_states(lm.model, batch["tokens"], batch["attention"], bidirectional=True)
        labels_BL = batch["labels"][:, 1:]  # position t-1 predicts token t
        selected_BL = labels_BL != IGNORE
        hidden_MD = hidden_BLD[:, :-1][selected_BL]
        return {"logits": lm.lm_head(hidden_MD).float(), "labels": labels_BL[selected_BL]}

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = self.selected_logits(batch)
        return {"nll_sum": F.cross_entropy(out["logits"], out["labels"], reduction="sum"),
                "selected": torch.tensor(float(out["labels"].numel()), device=out["labels"].device)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every decoder layer (``train.grad_checkpointing``), non-reentrant."""
        set_layer_checkpointing(self.lm, enable)


class MntpLoss(nn.Module):
    """Mean cross-entropy over the selected positions of the global batch: ``nll_sum / selected`` (the model's
    sums), or from ``logits`` [M, V] or [B, L, V] with ``IGNORE`` labels.

    Across ranks the count is the global one (one all-reduce of a 0-dim tensor, on the device): each rank's
    loss is ``W * nll_sum_r / selected_all``, so DDP's gradient mean over the W ranks is the single process's
    ``sum_r nll_sum_r / selected_all``, whatever the ranks' own counts. (LLM2Vec's trainer divides by each
    rank's own count before averaging, which weights a rank's tokens by how few it selected.)
    """

    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        if "nll_sum" in features:
            total, count = features["nll_sum"], features["selected"]
        else:
            logits, labels = features["logits"], features["labels"]
            total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                    reduction="sum")
            count = (labels != IGNORE).sum()
        world = get_world_size()
        if world > 1:
            count = all_reduce_sum(count.detach().clone()) / world
        loss = total / count.clamp(min=1)  # no NaN for a batch without selected tokens
        return LossOutput(loss, {"loss_mntp": loss.detach()})
