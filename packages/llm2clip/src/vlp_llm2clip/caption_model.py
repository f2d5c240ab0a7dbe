"""Stage 1 model: the bidirectional, mean-pooling text model with LoRA, embedding query/positive/negative rows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlp_llm2clip.config import LORA_TARGETS, CaptionContrastiveConfig
from vlp_llm2clip.encoder import LlmEncoder, load_encoder, set_layer_checkpointing
from vlp_llm2clip.model import resolve_text_model

__all__ = ["CaptionEmbedder", "lora_targets", "used_modules"]


def lora_targets(cfg: CaptionContrastiveConfig, model_type: str) -> list[str]:
    if cfg.lora_targets:
        return [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    family = "bert" if model_type in ("bert", "roberta", "xlm-roberta", "distilbert") else "llama"
    return LORA_TARGETS[family].split(",")


def used_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the modules named by ``targets`` (last name component), except those the embedding never
    uses: BERT's ``pooler`` (mean pooling reads the last hidden states), whose LoRA would get no gradient."""
    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets and "pooler" not in n.split(".")]
    if not names:
        raise ValueError(f"loss.lora_targets {','.join(targets)} name no module of the text model")
    return names


class CaptionEmbedder(nn.Module):
    """``forward(batch)`` -> ``{"q", "p"[, "n"]}`` [B, D] float32 embeddings, from one forward over 2-3B rows.

    The base model's weights are in ``dtype`` (``loss.llm_dtype``); peft keeps the LoRA weights in float32.
    """

    def __init__(self, cfg: CaptionContrastiveConfig, *, from_config: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        encoder = load_encoder(resolve_text_model(cfg.text_model), bidirectional=cfg.bidirectional,
                               from_config=from_config, dtype=dtype)
        encoder.settings.pool_bos = cfg.pool_bos
        if cfg.lora:
            from peft import LoraConfig, get_peft_model

            targets = used_modules(encoder.model, lora_targets(cfg, encoder.model.config.model_type))
            lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              bias="none", target_modules=targets)
            encoder.model = get_peft_model(encoder.model, lora)
        self.encoder: LlmEncoder = encoder

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        names = [n for n in ("q", "p", "n") if f"{n}_tokens" in batch]
        tokens = torch.cat([batch[f"{n}_tokens"] for n in names])
        attention = torch.cat([batch[f"{n}_attention"] for n in names])
        pool = torch.cat([batch[f"{n}_pool"] for n in names])
        emb = self.encoder(tokens, attention, pool)
        return dict(zip(names, emb.chunk(len(names))))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_layer_checkpointing(self.encoder.model, enable)
