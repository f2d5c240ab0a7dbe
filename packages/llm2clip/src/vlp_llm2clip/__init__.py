"""LLM2CLIP (Huang et al. 2024): an LLM made a caption embedder (stage 1), then CLIP's vision tower fine-tuned
against its frozen, precomputed caption embeddings through a residual-MLP adapter (stage 2).

Two methods plug into the core: ``METHOD`` (stage 2, ``llm2clip-train``) and ``LLM_METHOD`` (stage 1,
``llm2clip-finetune-llm``); ``llm2clip-embed`` bridges them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp_core.config import RunConfig
from vlp_core.method import MethodSpec
from vlp_llm2clip.config import CaptionContrastiveConfig, Llm2ClipConfig
from vlp_llm2clip.presets import LLM_PRESETS, PRESETS

__version__ = "0.1.0"
__all__ = ["METHOD", "LLM_METHOD", "Llm2ClipConfig", "CaptionContrastiveConfig", "ensure_embeddings",
           "train_pattern", "__version__"]


def _caption_keys(cfg: RunConfig) -> list[str]:
    return [k.strip() for k in cfg.loss.caption_keys.split(",") if k.strip()]


_PROBE = "A small red circle, left of a large blue square; 3 stars!"


def _check_tokenizer(cfg: RunConfig, tokenizer: Any) -> None:
    """``model.text.tokenizer`` must tokenize as the text model's own tokenizer (the folder's files): the same
    folder, or one giving the same ids (a preset names the hub tokenizer, e.g. Llama-3's; the user's folder of
    the fine-tuned model ships the same). Stand-ins without a ``name`` (meta builds) are not checked."""
    from vlp_core.data.tokenizer import Tokenizer
    from vlp_llm2clip.model import resolve_text_model

    name = str(getattr(tokenizer, "name", "") or "")
    if not name or not cfg.loss.text_model:
        return
    want = resolve_text_model(cfg.loss.text_model)
    if os.path.realpath(name) == os.path.realpath(want):
        return
    hint = (f"model.text.tokenizer ({name}) must be the text model's own tokenizer: "
            f"set --set model.text.tokenizer={want}")
    try:
        own = Tokenizer.from_pretrained(want, context_length=tokenizer.context_length)
    except ValueError as e:
        raise ValueError(f"{hint} (its tokenizer could not be read: {e})") from None
    ids = ("vocab_size", "bos_id", "eot_id", "pad_id")
    same = all(getattr(own, k) == getattr(tokenizer, k) for k in ids)
    if not same or not torch.equal(own([_PROBE]), tokenizer([_PROBE])):
        raise ValueError(hint)


def _record(cfg: RunConfig) -> dict[str, Any]:
    """What the run needs the embeddings to have been made with (see :func:`vlp_llm2clip.embed.run_record`)."""
    from vlp_llm2clip.embed import run_record
    from vlp_llm2clip.encoder import EncoderSettings
    from vlp_llm2clip.model import resolve_text_model

    text_model = resolve_text_model(cfg.loss.text_model)
    return run_record(text_model, EncoderSettings.read(text_model), cfg.model.text.context_length,
                      cfg.loss.caption_instruction)


def train_pattern(cfg: RunConfig) -> str:
    """The training shards: ``data.train_data`` or the shapes world's train split."""
    if cfg.data.train_data:
        return cfg.data.train_data
    from vlp_core.data.synthetic import ensure_world

    train = Path(ensure_world(cfg.data)) / "train"
    shards = sorted(train.glob("*.tar"))
    if not shards:
        raise ValueError(f"no training shards in {train}")
    return f"{train}/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


def ensure_embeddings(cfg: RunConfig) -> Path:
    """``loss.embeddings`` (checked against the run: text model, pooling, context length, instruction), or a
    cache folder filled on first use (a file lock lets one rank compute it)."""
    from vlp_llm2clip.embed import FORMAT_VERSION, MANIFEST, check_embeddings, embed_shards

    record = _record(cfg)
    if cfg.loss.embeddings:
        folder = Path(cfg.loss.embeddings)
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"loss.embeddings {folder} holds no {MANIFEST}: run llm2clip-embed first")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except ValueError as e:
            raise ValueError(f"loss.embeddings {folder}/{MANIFEST} is not valid JSON ({e})") from None
        check_embeddings(manifest, record, folder)
        return folder
    text_model = record["text_model"]
    pattern = train_pattern(cfg)
    ident = json.dumps([FORMAT_VERSION, text_model, record["text_model_fingerprint"], pattern, _caption_keys(cfg),
                        cfg.model.text.context_length, cfg.loss.caption_instruction])
    root = Path(os.environ.get("VLP_CACHE", Path.home() / ".cache" / "vlp")) / "llm2clip-embeddings"
    folder = root / hashlib.sha1(ident.encode()).hexdigest()[:12]
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here, then find every shard done
        embed_shards(pattern, folder, text_model=text_model, caption_keys=_caption_keys(cfg),
                     context_length=cfg.model.text.context_length, batch_size=cfg.loss.embed_batch_size,
                     progress=True, instruction=cfg.loss.caption_instruction)
    return folder


def build_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    from vlp_llm2clip.model import Llm2ClipModel, text_dim

    _check_tokenizer(cfg, tokenizer)
    return Llm2ClipModel(cfg, llm_dim=text_dim(cfg.loss.text_model, cfg.loss.text_dim), tokenizer=tokenizer)


def build_loss(cfg: RunConfig) -> nn.Module:
    from vlp_llm2clip.loss import ImageTextLoss

    c = cfg.loss
    return ImageTextLoss(init_temperature=c.init_temperature, learn_temperature=c.learn_temperature,
                         max_logit_scale=c.max_logit_scale)


def build_adapter(cfg: RunConfig, tokenizer: Any):
    from vlp_llm2clip.data import EmbeddingAdapter
    from vlp_llm2clip.embed import EmbeddingIndex

    index = EmbeddingIndex(ensure_embeddings(cfg))
    return EmbeddingAdapter(index, caption_keys=_caption_keys(cfg), image_size=cfg.model.vision.image_size,
                            augment=cfg.data.augment, interpolation=cfg.model.vision.interpolation)


def build_llm_model(cfg: RunConfig, tokenizer: Any) -> nn.Module:
    """Stage 1's model, the text model's weights in ``loss.llm_dtype`` (resolved against the run's device and
    ``train.precision``)."""
    from vlp_llm2clip.caption_model import CaptionEmbedder
    from vlp_llm2clip.encoder import resolve_llm_dtype

    _check_tokenizer(cfg, tokenizer)
    dtype = resolve_llm_dtype(cfg.loss.llm_dtype, cfg.train.precision)
    if cfg.loss.objective == "mntp":
        from vlp_llm2clip.mntp import MntpModel

        return MntpModel(cfg.loss, dtype=dtype)
    return CaptionEmbedder(cfg.loss, dtype=dtype)


def build_llm_loss(cfg: RunConfig) -> nn.Module:
    from vlp_llm2clip.loss import SimCseLoss

    if cfg.loss.objective == "mntp":
        from vlp_llm2clip.mntp import MntpLoss

        return MntpLoss()
    return SimCseLoss(cfg.loss.scale)


def build_llm_adapter(cfg: RunConfig, tokenizer: Any):
    from vlp_llm2clip.data import CaptionTripleAdapter

    if cfg.loss.objective == "mntp":
        from vlp_llm2clip.mntp import MntpAdapter

        return MntpAdapter(cfg.loss, tokenizer)
    return CaptionTripleAdapter(cfg.loss, tokenizer)


METHOD = MethodSpec(
    name="llm2clip",
    config_cls=Llm2ClipConfig,
    presets=PRESETS,
    build_model=build_model,
    build_loss=build_loss,
    build_adapter=build_adapter,
    exact_accumulation=True,  # InfoNCE over the merged image/adapter features of the whole rank batch
    description="LLM2CLIP stage 2: vision tower + adapter trained against frozen text-model embeddings",
)

LLM_METHOD = MethodSpec(
    name="llm2clip_llm",
    config_cls=CaptionContrastiveConfig,
    presets=LLM_PRESETS,
    build_model=build_llm_model,
    build_loss=build_llm_loss,
    build_adapter=build_llm_adapter,
    # SimCSE: q/p/n features merged over the chunks, dropout replayed per chunk; MNTP: per-chunk 0-dim sums
    # (cross-entropy and selected-token count) added, so the loss is normalised over the whole step's tokens.
    exact_accumulation=True,
    default_preset="llm_demo",
    description="LLM2CLIP stage 1: caption-contrastive (supervised SimCSE) LoRA fine-tuning of a text model",
)
