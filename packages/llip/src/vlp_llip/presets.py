"""Run presets for Llip: plain functions returning a fresh ``RunConfig``.

The paper's models follow the official model configs and run config (spec sections 1.4 and 3): AdamW
(0.9, 0.95, eps 1e-6), weight decay 0.2, 2,000 warm-up steps then cosine, no gradient clipping, global batch
32,768 for 12.8B samples (390,625 steps), 224 px, context 77, tau 5 (1 for L/14), 8 cross-attention heads,
LayerNorm on Q/K/V for H/14 and G/14. ``demo`` is a tiny model for the shapes world.
"""

from __future__ import annotations

from collections.abc import Callable

from vlp_core.clip import presets as clip_presets
from vlp_core.config import RunConfig
from vlp_llip.config import LlipConfig

__all__ = ["PRESETS", "demo", "register_demo", "smoke", "llip_b16_k32", "llip_l14_k32", "llip_h14_k64",
           "llip_g14_k64"]


def _llip_vision(cfg: RunConfig, tokens: int) -> None:
    v = cfg.model.vision
    v.class_token, v.extra_tokens, v.pool = False, tokens, "none"


def demo() -> RunConfig:
    """Same towers, data, steps and batch as the core's CLIP ``demo`` (a few minutes on 2 CPU cores), K=8.

    The shapes world's images hold 1-3 objects and the clean captions name every one of them.
    """
    cfg = clip_presets.demo()
    cfg.loss = LlipConfig(caption_keys=cfg.loss.caption_keys)
    _llip_vision(cfg, 8)
    return cfg


def register_demo() -> RunConfig:
    """The ablation baseline at equal token count: SigLIP on the first of the same K tokens."""
    cfg = demo()
    cfg.loss.variant = "register"
    return cfg


def smoke() -> RunConfig:
    """A few steps of a very small model: for tests and a quick check of an install."""
    cfg = demo()
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


def _paper(*, width: int, depth: int, heads: int, patch: int, tokens: int, embed: int, text_width: int,
           text_depth: int, text_heads: int, tau: float, use_norm: bool, lr: float, chunk: int,
           mlp_ratio: float = 4.0) -> RunConfig:
    cfg = RunConfig(loss=LlipConfig(tau=tau, use_norm=use_norm, heads=8, chunk=chunk))
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio = 224, patch, width, depth, heads, mlp_ratio
    _llip_vision(cfg, tokens)
    t.context_length, t.width, t.depth, t.heads = 77, text_width, text_depth, text_heads
    cfg.model.embed_dim = embed
    o = cfg.optim
    o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.warmup_steps = lr, 0.2, 0.9, 0.95, 1e-6, 2000
    cfg.train.steps, cfg.train.batch_size, cfg.train.grad_clip, cfg.train.save_every = 390_625, 32768, 0.0, 1000
    cfg.data.workers, cfg.data.resampled, cfg.data.augment = 8, True, True
    return cfg


def llip_b16_k32() -> RunConfig:
    """ViT-B/16 with 32 mixture tokens: 768/12/12 vision, 512/12/8 text, D=512, tau 5, lr 5e-4, 256x256 blocks."""
    return _paper(width=768, depth=12, heads=12, patch=16, tokens=32, embed=512, text_width=512, text_depth=12,
                  text_heads=8, tau=5.0, use_norm=False, lr=5e-4, chunk=256)


def llip_l14_k32() -> RunConfig:
    """ViT-L/14 with 32 mixture tokens: 1024/24/16 vision, 768/12/12 text, D=768, tau 1, context 64."""
    cfg = _paper(width=1024, depth=24, heads=16, patch=14, tokens=32, embed=768, text_width=768, text_depth=12,
                 text_heads=12, tau=1.0, use_norm=False, lr=4e-4, chunk=256)
    cfg.model.text.context_length = 64
    return cfg


def llip_h14_k64() -> RunConfig:
    """ViT-H/14 with 64 mixture tokens: 1280/32/16 vision, 1024/24/16 text, D=1024, LayerNorm on Q/K/V."""
    return _paper(width=1280, depth=32, heads=16, patch=14, tokens=64, embed=1024, text_width=1024, text_depth=24,
                  text_heads=16, tau=5.0, use_norm=True, lr=4e-4, chunk=128)


def llip_g14_k64() -> RunConfig:
    """ViT-G/14 with 64 mixture tokens: 1664/48/16 (mlp 4.9231), 1280/32/20 text, D=1280, LayerNorm, checkpointing."""
    cfg = _paper(width=1664, depth=48, heads=16, patch=14, tokens=64, embed=1280, text_width=1280, text_depth=32,
                 text_heads=20, tau=5.0, use_norm=True, lr=4e-4, chunk=128, mlp_ratio=4.9231)
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
