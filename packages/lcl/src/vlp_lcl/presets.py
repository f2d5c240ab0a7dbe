"""Run presets for LCL: plain functions returning a fresh ``RunConfig``.

The released configs (OpenGVLab/LCL ``model_configs`` + ``scripts``) are ``lcl_b32_laion``, ``lcl_b16_laion``
and ``lcl_b32_mmc4`` (pass ``--train-data``); ``demo`` trains on the shapes world's image-caption pairs and
its interleaved documents, mixed by weight, in a few minutes on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vlp_core.config import RunConfig
from vlp_core.convert.archs import openai_clip_config
from vlp_lcl.config import LclConfig

__all__ = ["PRESETS", "demo", "demo_gen_only", "demo_docs", "smoke", "lcl_b32_laion", "lcl_b16_laion",
           "lcl_b32_mmc4", "world_sources"]

_SHARD = 1000  # shapes-world shard size (vlp_core.data.synthetic.generate_world's default)
_DOCS = 2000  # documents in the default shapes world


def world_sources(cfg: RunConfig, *, pairs: bool = True, docs: bool = True) -> str:
    """``data.train_data`` for the default shapes world of ``cfg.data``: its pairs and/or documents (``::``)."""
    from vlp_core.data.synthetic import default_world_dir

    root = default_world_dir(cfg.data.world_seed, cfg.data.world_noise, cfg.data.world_train_samples)
    out = []
    if pairs:
        out.append(f"{root}/train/{{00000..{math.ceil(cfg.data.world_train_samples / _SHARD) - 1:05d}}}.tar")
    if docs:
        out.append(f"{root}/docs/{{00000..{math.ceil(_DOCS / _SHARD) - 1:05d}}}.tar")
    return "::".join(out)


def demo() -> RunConfig:
    """Tiny LCL on the shapes world's pairs + interleaved documents (1:1): 5-8 minutes on 2 CPU cores.

    The ViT is the CLIP demo's (64 px, conv stem, 3 x 96) at patch 16, so 16 visual tokens per image keep
    the LM's sequences short (at most 160); ``clip-train --batch-size 64 --set model.vision.patch_size=16``
    gives the like-for-like CLIP baseline (same ViT, steps and batch).
    """
    cfg = RunConfig(loss=LclConfig(caption_keys="json.clean", pool_heads=4))
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 64, 16, 96, 3, 4
    v.stem, v.pool = "conv", "avg"
    # A document holds 2-4 images (18 tokens each) and ~10 sentences: 160 fits nearly all of them whole.
    t.context_length, t.width, t.depth, t.heads = 160, 96, 2, 4
    cfg.model.embed_dim = 96
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = 2e-3, 0.1, 40
    cfg.train.steps, cfg.train.batch_size = 300, 64
    cfg.train.save_every, cfg.train.log_every, cfg.train.image_grid_every = 100, 10, 0
    cfg.data.workers = 1
    cfg.data.train_data = world_sources(cfg)
    cfg.data.train_weights = "1::1"
    return cfg


def demo_gen_only() -> RunConfig:
    """The demo with the contrastive term off (lambda = 0): the generation-only ablation."""
    cfg = demo()
    cfg.loss.contrastive_weight = 0.0
    return cfg


def demo_docs() -> RunConfig:
    """The demo on the shapes world's interleaved documents alone (no image-caption pairs)."""
    cfg = demo()
    cfg.data.train_data = world_sources(cfg, pairs=False)
    cfg.data.train_weights = ""
    return cfg


def smoke() -> RunConfig:
    """A few steps of a very small model on the shapes world: for tests and a quick check of an install."""
    cfg = demo()
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 32, 16, 32, 1, 2
    v.stem, v.pool = "patch", "token"
    t.context_length, t.width, t.depth, t.heads = 96, 32, 1, 2
    cfg.model.embed_dim = 32
    cfg.loss.pool_heads = 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.log_every = 4, 8, 2, 1
    cfg.optim.warmup_steps = 1
    cfg.data.workers, cfg.data.shuffle_buffer = 1, 16
    return cfg


def _openclip_towers(*, patch: int, text_width: int, text_heads: int, context_length: int) -> RunConfig:
    """The released configs' towers (spec sections 1.2-1.5): OpenCLIP's ViT-B (224 px, 12 x 768, class token,
    ``ln_pre``, exact GELU, LayerNorm eps 1e-5, bicubic, CLIP mean/std; its projection is unused: the class
    token is dropped and the attentive pooling projects the patches) and OpenCLIP's text transformer as the
    12-layer causal LM (eps 1e-5, GELU) over OpenAI's CLIP BPE (``clip-bpe``) + the 3 image-span tokens
    (vocabulary 49,411, so ``vocab_size`` stays 0 = the tokenizer's + 3), embedding = LM width."""
    cfg = openai_clip_config(patch=patch, act="gelu", text_width=text_width, text_heads=text_heads,
                             embed_dim=text_width, context_length=context_length)
    cfg.model.text.vocab_size = 0
    return cfg


def lcl_b32_laion() -> RunConfig:
    """``LCL_ViT-B-32_laion``: 224 px ViT-B/32 (49 visual tokens), 12 x 512 LM with context 128, on pairs.

    177,659,905 parameters (spec section 1.7: 177.66M).
    """
    cfg = _openclip_towers(patch=32, text_width=512, text_heads=8, context_length=128)
    cfg.loss = LclConfig(pool_heads=8)
    # OpenCLIP defaults the script inherits: AdamW(0.9, 0.98, 1e-6), lr 5e-4, wd 0.2, warmup 2000.
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = 5e-4, 0.2, 2000
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every = 400_000, 32768, 1000
    cfg.train.grad_clip = 0.0  # no gradient clipping in the official runs
    cfg.data.workers, cfg.data.resampled, cfg.data.augment = 10, True, True
    cfg.data.require_train_data = True
    return cfg


def lcl_b16_laion() -> RunConfig:
    """``LCL_ViT-B-16_laion``: ViT-B/16 (196 visual tokens), 12 x 768 LM with context 280, checkpointing.

    249,924,097 parameters (spec section 1.7: 249.92M).
    """
    cfg = lcl_b32_laion()
    cfg.model = _openclip_towers(patch=16, text_width=768, text_heads=12, context_length=280).model
    cfg.loss.pool_heads = 12
    cfg.train.grad_checkpointing = True
    return cfg


def lcl_b32_mmc4() -> RunConfig:
    """``LCL_ViT-B-32_mmc4``: the B/32 model with a 2048-token LM on MMC4 documents, lr 3e-4, checkpointing.

    178,642,945 parameters (the B/32 LAION model + 1,920 more positions of 512).
    """
    cfg = lcl_b32_laion()
    cfg.model.text.context_length = 2048
    cfg.optim.lr = 3e-4
    cfg.train.grad_checkpointing = True
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "demo": demo,
    "demo_gen_only": demo_gen_only,
    "demo_docs": demo_docs,
    "smoke": smoke,
    "lcl_b32_laion": lcl_b32_laion,
    "lcl_b16_laion": lcl_b16_laion,
    "lcl_b32_mmc4": lcl_b32_mmc4,
}
