"""Run presets for ALIP: plain functions returning a fresh ``RunConfig``."""

from __future__ import annotations

from collections.abc import Callable

from vlp_alip.config import AlipConfig
from vlp_core.clip import presets as clip_presets
from vlp_core.config import RunConfig
from vlp_core.convert.archs import openai_clip_config

__all__ = ["PRESETS", "demo", "demo_ungated", "smoke", "alip_b32_yfcc15m"]


def demo() -> RunConfig:
    """The CLIP demo's towers, steps and batch on the shapes world with 40% wrong or unrelated raw captions.

    Raw text = the noisy ``txt`` member, synthetic caption = the clean captioner-like ``json.clean`` field;
    equal budget with ``clip-train --set loss.caption_keys=txt --set data.world_noise=0.4``.
    """
    cfg = clip_presets.demo()
    cfg.loss = AlipConfig(raw_key="txt", caption_key="json.clean")
    cfg.data.world_noise = 0.4
    return cfg


def demo_ungated() -> RunConfig:
    """The demo without gates (all weights 1): the plain sum of two CLIP losses, Table 4's first row."""
    cfg = demo()
    cfg.loss.use_ws = cfg.loss.use_wt = cfg.loss.use_wc = False
    return cfg


def smoke() -> RunConfig:
    """A few steps of a very small model on the demo's data: for tests and a quick check of an install."""
    cfg = clip_presets.smoke()
    cfg.loss = AlipConfig(raw_key="txt", caption_key="json.clean")
    cfg.data.world_noise = 0.4
    return cfg


def alip_b32_yfcc15m() -> RunConfig:
    """The paper's ViT-B/32 on YFCC15M webdataset shards with ``syn.txt`` OFA captions (pass --train-data).

    Towers (spec section 2): the official code is an OpenCLIP fork with OpenCLIP's ``ViT-B-32`` config, so
    :func:`vlp_core.convert.archs.openai_clip_config` builds them: 224 px, patch 32, 12 x 768 ViT with class
    token, ``ln_pre``, exact GELU (``quick_gelu`` unset), LayerNorm eps 1e-5; 12 x 512 causal text tower over
    77 tokens of OpenAI's CLIP BPE (``clip-bpe``, shipped offline; the official ``tokenizer.py``), first-EOT
    pooling; bias-free projections to 512; CLIP mean/std, bilinear resizing (the DALI training pipeline).

    Official recipe (spec section 5): global batch 4096, 32 epochs of 15,061,515 pairs = 3678 x 32 = 117,696
    steps; AdamW lr 1e-3, weight decay 0.2, betas (0.9, 0.98), eps 1e-8; warm-up over the first 10% (11,770
    steps), then cosine decay to lr / 25 / 1e4 = 4e-9; grad-norm clip 1.0; temperature 0.07 learnable and
    capped at 100; gates m = 0.99, H0 = 1, gamma_s = gamma_p = 2. Differences forced by the core (see the
    README): a linear (not cosine-shaped, from lr/25) warm-up, beta1 fixed at 0.9 (OneCycleLR's hidden
    0.95 -> 0.85 cycle is not reproduced), no weight decay on biases, norms, embeddings and the temperature.
    """
    cfg = openai_clip_config(act="gelu")  # OpenCLIP's ViT-B-32 towers, 151,277,313 parameters with the scale
    cfg.loss = AlipConfig(raw_key="txt", caption_key="syn.txt")
    # The official DALI training pipeline resizes bilinearly (spec section 5; its evaluation uses bicubic).
    cfg.model.vision.interpolation = "bilinear"
    o = cfg.optim
    o.lr, o.weight_decay, o.beta1, o.beta2, o.eps = 1e-3, 0.2, 0.9, 0.98, 1e-8
    o.warmup_steps, o.schedule, o.min_lr_ratio = 11_770, "cosine", 4e-6
    tr = cfg.train
    tr.steps, tr.batch_size, tr.accum_steps, tr.grad_clip = 117_696, 4096, 1, 1.0
    tr.grad_checkpointing, tr.save_every, tr.log_every = True, 3678, 50
    cfg.data.workers, cfg.data.resampled, cfg.data.augment, cfg.data.shuffle_buffer = 8, True, True, 16384
    cfg.data.require_train_data = True
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "demo": demo,
    "demo_ungated": demo_ungated,
    "smoke": smoke,
    "alip_b32_yfcc15m": alip_b32_yfcc15m,
}
