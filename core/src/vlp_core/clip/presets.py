"""Run presets for the CLIP/SigLIP baseline: plain functions returning a fresh ``RunConfig``."""

from __future__ import annotations

from collections.abc import Callable

from vlp_core.clip.config import ClipConfig
from vlp_core.config import RunConfig

__all__ = ["PRESETS", "demo", "siglip_demo", "smoke", "vit_b32", "siglip_b16"]


def demo() -> RunConfig:
    """Tiny dual encoder on the shapes world: under 5 minutes on 2 CPU cores, then zero-shot and retrieval.

    A convolutional stem with average pooling learns shapes far faster than a linear patch embedding on
    this little data (a supervised probe: 87% vs 31% shape accuracy after 240 steps); clean captions, which
    name every object, give the best retrieval at this budget.
    """
    cfg = RunConfig(loss=ClipConfig(caption_keys="json.clean"))
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 64, 8, 96, 3, 4
    v.stem, v.pool = "conv", "avg"
    t.context_length, t.width, t.depth, t.heads = 32, 96, 2, 4
    cfg.model.embed_dim = 96
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = 2e-3, 0.1, 40
    cfg.train.steps, cfg.train.batch_size = 300, 128
    cfg.train.save_every, cfg.train.log_every, cfg.train.image_grid_every = 100, 10, 100
    cfg.data.workers = 1
    return cfg


def siglip_demo() -> RunConfig:
    cfg = demo()
    cfg.loss.kind = "siglip"
    return cfg


def smoke() -> RunConfig:
    """A few steps of a very small model: for tests and a quick check of an install."""
    cfg = demo()
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 32, 8, 32, 1, 2
    v.stem, v.pool = "patch", "token"
    t.context_length, t.width, t.depth, t.heads = 16, 32, 1, 2
    cfg.model.embed_dim = 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.log_every = 4, 16, 2, 1
    cfg.optim.warmup_steps = 1
    cfg.data.workers, cfg.data.shuffle_buffer = 1, 16
    cfg.data.world_train_samples = 200
    return cfg


def vit_b32() -> RunConfig:
    """OpenCLIP's ViT-B/32 on LAION-style shards (pass ``--train-data``): 224 px, 12x768 vision, 12x512 text."""
    cfg = RunConfig(loss=ClipConfig())
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 224, 32, 768, 12, 12
    t.context_length, t.width, t.depth, t.heads = 77, 512, 12, 8
    cfg.model.embed_dim = 512
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = 5e-4, 0.2, 2000
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every = 100_000, 32768, 1000
    cfg.data.workers, cfg.data.resampled, cfg.data.augment = 8, True, True
    return cfg


def siglip_b16() -> RunConfig:
    cfg = vit_b32()
    cfg.model.vision.patch_size = 16
    cfg.model.text.context_length = 64
    cfg.model.embed_dim = 768
    cfg.loss.kind = "siglip"
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "demo": demo,
    "siglip_demo": siglip_demo,
    "smoke": smoke,
    "vit_b32": vit_b32,
    "siglip_b16": siglip_b16,
}
