"""Run presets for Llip: plain functions returning a fresh ``RunConfig``.

The paper's models follow the official model configs and run config (spec sections 1.4 and 3), component for
component: OpenAI-layout towers with QuickGELU in both (``ln_pre``, LayerNorm eps 1e-5, bias-free patch
embedding), the K mixture tokens in place of the class token, OpenAI's BPE (``clip-bpe``, 49,408 ids),
context 77 (64 for L/14), 224 px, bicubic resizing and CLIP mean/std; AdamW (0.9, 0.95, eps 1e-6), weight
decay 0.2, 2,000 warm-up steps then cosine, no gradient clipping, global batch 32,768 for 12.8B samples
(390,625 steps), tau 5 (1 for L/14), 8 cross-attention heads, LayerNorm on Q/K/V and activation
checkpointing for H/14 and G/14. ``demo`` is a tiny model for the shapes world.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vlp_core.clip import presets as clip_presets
from vlp_core.config import RunConfig
from vlp_llip.config import LlipConfig

__all__ = ["PRESETS", "PAPER_PRESETS", "paper_config", "demo", "register_demo", "smoke", "llip_b16_k32",
           "llip_l14_k32", "llip_h14_k64", "llip_g14_k64"]


def _llip_vision(cfg: RunConfig, tokens: int) -> None:
    v = cfg.model.vision
    v.class_token, v.extra_tokens, v.pool = False, tokens, "none"


def demo() -> RunConfig:
    """The core CLIP ``demo``'s data, steps, batch and tower sizes (a few minutes on 2 CPU cores), K=8.

    The shapes world's images hold 1-3 objects and the clean captions name every one of them. Besides
    ``retrieval`` it evaluates ``retrieval_multi``, whose captions each name one object of a 2-3 object
    image (several distinct true captions per image, matched by text): the case caption-conditioned image
    embeddings are for.

    Demo choices (the paper presets keep the paper's values):
    - the logit bias starts at -4, not -10 (from -10 the positives cannot reach a positive logit in 300 steps,
      as for the core's ``siglip_demo``), and the logit scale at SigLIP's 10, not 14.3;
    - ``loss.head_init='shared'``: the K per-token key/value projections start as copies of one draw and the
      output projection at the identity (with K independent draws Llip stalled near chance at every seed
      tried: i2t R@1 8.2 / 1.6 / 4.4% at seeds 0-2);
    - the vision tower's linear patch embedding (``stem='patch'``), not the CLIP demo's convolutional stem, with
      the mixture tokens at Llip's own width**-0.5. With the convolutional stem (and tokens at 1e-6) Llip
      pooled its tokens into a useful embedding at only 3 of 5 seeds and stalled near chance at the others,
      the default seed 0 among them (1.7 / 27.3 / 45.4 / 1.1 / 44.0%); with the patch stem and tokens at 1e-6
      it took off at 4 of 4 (25.6 / 16.2 / 20.1 / 22.2%), and with both changes it ends at 36-41% (README,
      "Fourth round").
    """
    cfg = clip_presets.demo()
    cfg.loss = LlipConfig(caption_keys=cfg.loss.caption_keys, init_bias=-4.0, token_init_std=None,
                          init_logit_scale=math.log(10), head_init="shared")
    cfg.model.vision.stem = "patch"
    _llip_vision(cfg, 8)
    cfg.eval.retrieval = "retrieval,retrieval_multi"
    return cfg


def register_demo() -> RunConfig:
    """The ablation baseline at equal token count: SigLIP on the first of the same K tokens.

    It is SigLIP, so its logit scale starts at SigLIP's 10 (as Llip's ``demo`` does), with Llip's tower (the
    linear patch stem, tokens at width**-0.5). It has no mixture head, so ``loss.head_init`` does not touch it.
    i2t R@1 16.5 / 12.4 / 21.3% at seeds 0 / 1 / 2, against Llip's 40.5 / 40.2 / 39.6% and the core's SigLIP on
    the patch average of the same tower 13.1 / 12.9 / 14.7% (README, ``bench/llip_vs_register.yaml``).
    """
    cfg = demo()
    cfg.loss.variant = "register"
    return cfg


def smoke() -> RunConfig:
    """A few steps of a very small model: for tests and a quick check of an install."""
    cfg = demo()
    # The paper's head initialisation and scale: K distinct per-token projections, so tests see each token's own.
    cfg.loss.head_init, cfg.loss.init_logit_scale = "random", math.log(1 / 0.07)
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.stem = 32, 8, 32, 1, 2, "patch"
    _llip_vision(cfg, 4)
    t.context_length, t.width, t.depth, t.heads = 16, 32, 1, 2
    cfg.model.embed_dim = 32
    cfg.loss.chunk = 8
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.log_every = 4, 16, 2, 1
    cfg.optim.warmup_steps = 1
    cfg.data.workers, cfg.data.shuffle_buffer = 1, 16
    cfg.data.world_train_samples = 200
    return cfg


# The four models of the paper (spec section 1.4), in the order of the table.
PAPER_PRESETS = ("llip_b16_k32", "llip_l14_k32", "llip_h14_k64", "llip_g14_k64")


def paper_config(
    *, vision_width: int, vision_layers: int, vision_heads: int, patch: int, tokens: int, embed_dim: int,
    text_width: int, text_layers: int, text_heads: int, tau: float, use_norm: bool, lr: float = 4e-4,
    chunk: int = 128, vision_mlp_ratio: float = 4.0, text_mlp_ratio: float = 4.0, image_size: int = 224,
    context_length: int = 77, vocab_size: int = 49408, xattn_heads: int = 8,
) -> RunConfig:
    """A Llip model with the official towers and the paper's training recipe (also what the reader builds).

    Towers: the core's OpenAI-layout CLIP config (:func:`vlp_core.convert.archs.openai_clip_config`) with
    QuickGELU in both towers: ``ln_pre``, LayerNorm eps 1e-5, bias-free patch embedding, bicubic resizing,
    CLIP mean/std, a causal text tower over OpenAI's BPE (``clip-bpe``) pooled at the first end-of-text token.
    The class token is replaced by the K mixture tokens (each with its own position row) and the image tower
    has no projection of its own (Llip's per-token key/value projections take its place).

    Recipe (spec section 3): AdamW (0.9, 0.95, eps 1e-6), weight decay 0.2, 2,000 warm-up steps then cosine,
    no gradient clipping, a global batch of 32,768 for 390,625 steps (12.8B samples), 8 cross-attention heads.
    """
    from vlp_core.convert.archs import openai_clip_config

    cfg = openai_clip_config(
        vision_width=vision_width, vision_layers=vision_layers, patch=patch, image_size=image_size,
        text_width=text_width, text_layers=text_layers, text_heads=text_heads, embed_dim=embed_dim,
        context_length=context_length, vocab_size=vocab_size, act="quick_gelu", vision_heads=vision_heads,
        vision_mlp_ratio=vision_mlp_ratio, text_mlp_ratio=text_mlp_ratio,
    )
    cfg.method = "llip"
    cfg.loss = LlipConfig(tau=tau, use_norm=use_norm, heads=xattn_heads, chunk=chunk)
    _llip_vision(cfg, tokens)
    o = cfg.optim
    o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.warmup_steps = lr, 0.2, 0.9, 0.95, 1e-6, 2000
    cfg.train.steps, cfg.train.batch_size, cfg.train.grad_clip, cfg.train.save_every = 390_625, 32768, 0.0, 1000
    cfg.data.workers, cfg.data.resampled, cfg.data.augment = 8, True, True
    cfg.data.require_train_data = True
    return cfg


def llip_b16_k32() -> RunConfig:
    """ViT-B/16 with 32 mixture tokens: 768/12/12 vision, 512/12/8 text, D=512, tau 5, lr 5e-4, 256x256 blocks."""
    return paper_config(vision_width=768, vision_layers=12, vision_heads=12, patch=16, tokens=32, embed_dim=512,
                        text_width=512, text_layers=12, text_heads=8, tau=5.0, use_norm=False, lr=5e-4, chunk=256)


def llip_l14_k32() -> RunConfig:
    """ViT-L/14 with 32 mixture tokens: 1024/24/16 vision, 768/12/12 text, D=768, tau 1, context 64."""
    return paper_config(vision_width=1024, vision_layers=24, vision_heads=16, patch=14, tokens=32, embed_dim=768,
                        text_width=768, text_layers=12, text_heads=12, tau=1.0, use_norm=False, chunk=256,
                        context_length=64)


def llip_h14_k64() -> RunConfig:
    """ViT-H/14 with 64 mixture tokens: 1280/32/16 (head width 80), 1024/24/16 text, D=1024, LayerNorm on
    Q/K/V, activation checkpointing."""
    cfg = paper_config(vision_width=1280, vision_layers=32, vision_heads=16, patch=14, tokens=64, embed_dim=1024,
                       text_width=1024, text_layers=24, text_heads=16, tau=5.0, use_norm=True)
    cfg.train.grad_checkpointing = True
    return cfg


def llip_g14_k64() -> RunConfig:
    """ViT-G/14 with 64 mixture tokens: 1664/48/16 (head width 104, mlp 4.9231), 1280/32/20 text, D=1280,
    LayerNorm on Q/K/V, activation checkpointing."""
    cfg = paper_config(vision_width=1664, vision_layers=48, vision_heads=16, patch=14, tokens=64, embed_dim=1280,
                       text_width=1280, text_layers=32, text_heads=20, tau=5.0, use_norm=True,
                       vision_mlp_ratio=4.9231)
    cfg.train.grad_checkpointing = True
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "demo": demo,
    "register_demo": register_demo,
    "smoke": smoke,
    "llip_b16_k32": llip_b16_k32,
    "llip_l14_k32": llip_l14_k32,
    "llip_h14_k64": llip_h14_k64,
    "llip_g14_k64": llip_g14_k64,
}
