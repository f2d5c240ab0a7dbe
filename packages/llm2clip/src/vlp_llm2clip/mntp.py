"""Optional stage 1a: LLM2Vec's masked next-token prediction (MNTP) with bidirectional attention.

A fraction ``p`` of the content tokens (not BOS/EOT/padding) is selected; of those 80% become the mask token
(``[MASK]`` if the tokenizer has one, else ``"_"``, LLM2Vec's "blank" choice for Llama), 10% a random token, 10%
stay. The logit at position t-1 predicts the original token t (the causal LM head, shifted labels):
``L = -mean_{t in M} log softmax(W h_{t-1})[x_t]`` over this rank's selected tokens.

Legend: B batch, L length, V vocabulary.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.data.adapters import read_caption
from vlp_core.method import LossOutput
from vlp_llm2clip.encoder import hidden_states, masks_from_tokens

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
        return {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "attention", "labels")}


class MntpModel(nn.Module):
    """A causal-LM (``AutoModelForCausalLM``) whose inner model runs bidirectionally; LoRA optional."""

    def __init__(self, cfg: Any, *, from_config: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        from vlp_llm2clip.model import resolve_text_model

        folder = resolve_text_model(cfg.text_model)
        if from_config:
            lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), attn_implementation="sdpa")
        else:
            lm = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
        for m in lm.modules():
            if getattr(m, "is_causal", False):
                m.is_causal = False
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            from vlp_llm2clip.caption_model import lora_targets

            lm = get_peft_model(lm, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                               bias="none", target_modules=lora_targets(cfg, lm.config.model_type)))
        self.lm = lm

    def causal_lm(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        lm = self.causal_lm()
        hidden_BLD = hidden_states(lm.model, batch["tokens"], batch["attention"], bidirectional=True)
        logits_BLV = lm.lm_head(hidden_BLD[:, :-1]).float()
        return {"logits": logits_BLV, "labels": batch["labels"][:, 1:]}


class MntpLoss(nn.Module):
    def forward(self, features: dict[str, Any], batch: dict[str, Any]) -> LossOutput:
        logits, labels = features["logits"], features["labels"]
        total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                reduction="sum")
        loss = total / (labels != IGNORE).sum().clamp(min=1)  # no NaN for a batch without selected tokens
        return LossOutput(loss, {"loss_mntp": loss.detach()})
