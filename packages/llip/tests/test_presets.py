"""Every Llip preset builds. The paper's four at full size on the meta device: their components are the official
ones, their parameter counts equal open_clip's model with the same towers turned into the official Llip layout
(K mixture tokens for the class token, no visual projection, the K/V/Q/out projections and norms), and that
released layout converts back to exactly the preset. A reduced copy of each trains one real step on CPU with
OpenAI's BPE.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from vlp_llip import METHOD
from vlp_llip.convert import read_llip

from vlp_core.config import to_dict
from vlp_core.convert import Source
from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD
from vlp_core.testing.presets import (
    TokenizerSpec,
    build_on_meta,
    count_parameters,
    load_tokenizer,
    one_step,
    reduced,
)

# preset: (open_clip model with the same towers, its context length, parameters of model + loss)
PAPER = {
    "llip_b16_k32": ("ViT-B-16-quickgelu", 77, 174_965_250),
    "llip_l14_k32": ("ViT-L-14-quickgelu", 64, 478_394_882),
    "llip_h14_k64": ("ViT-H-14-quickgelu", 77, 1_154_835_458),
    "llip_g14_k64": ("ViT-bigG-14-quickgelu", 77, 2_813_561_090),
}
# Spec section 1.4: the per-token K/V projections add 2*K*Wv*D parameters (in millions).
SPEC_KV_MILLIONS = {"llip_b16_k32": 25.2, "llip_l14_k32": 50.3, "llip_h14_k64": 167.8, "llip_g14_k64": 272.6}
# Spec section 1.4: (vision width, layers, heads, patch, mlp ratio, K, D, text width, layers, heads, context,
# use_norm, tau).
SPEC = {
    "llip_b16_k32": (768, 12, 12, 16, 4.0, 32, 512, 512, 12, 8, 77, False, 5.0),
    "llip_l14_k32": (1024, 24, 16, 14, 4.0, 32, 768, 768, 12, 12, 64, False, 1.0),
    "llip_h14_k64": (1280, 32, 16, 14, 4.0, 64, 1024, 1024, 24, 16, 77, True, 5.0),
    "llip_g14_k64": (1664, 48, 16, 14, 4.9231, 64, 1280, 1280, 32, 20, 77, True, 5.0),
}


# OpenAI's BPE ids (sot 49406, eot 49407, pad 0), without reading the vocabulary for every meta build.
CLIP_BPE_IDS = TokenizerSpec(vocab_size=49408, pad_id=0, eot_id=49407, bos_id=49406)


@functools.cache
def meta_build(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(model, loss)`` of a paper preset at full size on the meta device (built once per test session)."""
    return build_on_meta(METHOD, name, tokenizer=CLIP_BPE_IDS)


@functools.cache
def open_clip_state(name: str) -> dict[str, torch.Tensor]:
    """open_clip's model with the preset's towers, built on the meta device (test-only dependency)."""
    import open_clip

    model_name, context, _ = PAPER[name]
    with torch.device("meta"):
        model = open_clip.create_model(model_name, device="meta", force_context_length=context,
                                       init_logit_bias=-10.0)
    return dict(model.state_dict())


def released_layout(name: str) -> dict[str, torch.Tensor]:
    """The official Llip state dict of a preset (meta tensors), made from open_clip's keys and shapes."""
    cfg = METHOD.preset(name)
    K = cfg.model.vision.extra_tokens
    sd = dict(open_clip_state(name))
    Wv, patches = sd["visual.class_embedding"].shape[0], sd["visual.positional_embedding"].shape[0] - 1
    Wt, D = sd["text_projection"].shape
    del sd["visual.proj"]  # CMP sets visual.proj = None

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="meta")

    sd.update({"visual.class_embedding": meta(K, Wv), "visual.positional_embedding": meta(K + patches, Wv),
               "k_proj": meta(K, Wv, D), "v_proj": meta(K, Wv, D), "q_proj": meta(Wt, D), "pred.out_proj": meta(D, D)})
    if cfg.loss.use_norm:
        sd.update({f"{n}.{p}": meta(D) for n in ("K_norm", "Q_norm", "V_norm") for p in ("weight", "bias")})
    return sd


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_presets_use_the_official_components(name: str) -> None:
    cfg = METHOD.preset(name)
    cfg.validate()
    v, t, llip = cfg.model.vision, cfg.model.text, cfg.loss
    got = (v.width, v.depth, v.heads, v.patch_size, v.mlp_ratio, v.extra_tokens, cfg.model.embed_dim, t.width,
           t.depth, t.heads, t.context_length, llip.use_norm, llip.tau)
    assert got == SPEC[name]
    # "All models use QuickGELU in both towers, 224 px, context 77" (L/14: 64); OpenAI's ViT layout.
    assert (v.act, t.act, v.pre_norm, v.norm_eps, t.norm_eps) == ("quick_gelu", "quick_gelu", True, 1e-5, 1e-5)
    assert (v.image_size, v.class_token, v.pool, v.stem) == (224, False, "none", "patch")
    assert (t.kind, t.tokenizer, t.vocab_size, t.causal, t.pool) == ("clip", "clip-bpe", 49408, True, "eot")
    assert (v.interpolation, tuple(v.image_mean), tuple(v.image_std)) == ("bicubic", CLIP_MEAN, CLIP_STD)
    assert (llip.heads, llip.variant, cfg.method) == (8, "llip", "llip")
    o = cfg.optim
    assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, o.warmup_steps) == (
        5e-4 if name == "llip_b16_k32" else 4e-4, 0.9, 0.95, 1e-6, 0.2, 2000)
    assert (cfg.train.batch_size, cfg.train.steps, cfg.train.grad_clip) == (32768, 390_625, 0.0)
    assert cfg.train.grad_checkpointing == (name in ("llip_h14_k64", "llip_g14_k64"))


@pytest.mark.parametrize("name", list(PAPER))
def test_full_size_parameter_count_matches_open_clip_towers_plus_llip_heads(name: str) -> None:
    model, loss = meta_build(name)
    n = count_parameters(model, loss)
    reference = sum(t.numel() for t in released_layout(name).values())
    assert n == reference == PAPER[name][2]
    cfg = METHOD.preset(name)
    kv = 2 * cfg.model.vision.extra_tokens * cfg.model.vision.width * cfg.model.embed_dim
    assert round(kv / 1e6, 1) == SPEC_KV_MILLIONS[name]
    assert model.mixture.k_proj.numel() + model.mixture.v_proj.numel() == kv


@pytest.mark.parametrize("name", list(PAPER))
def test_released_layout_converts_to_exactly_the_preset(name: str) -> None:
    converted = read_llip(Source(path=Path(f"{name}.pt"), state_dict=released_layout(name)))
    assert to_dict(converted.config) == to_dict(METHOD.preset(name))
    model, loss = meta_build(name)
    want = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    want.update({f"loss.{k}": tuple(v.shape) for k, v in loss.state_dict().items()})
    assert {k: tuple(v.shape) for k, v in converted.state_dict.items()} == want


@pytest.mark.parametrize("name", ["demo", "register_demo", "smoke"])
def test_demo_presets_build(name: str) -> None:
    model, loss = build_on_meta(METHOD, name)
    assert count_parameters(model, loss) > 0


@pytest.mark.parametrize("name", list(PAPER))
def test_reduced_paper_preset_trains_one_step_with_clip_bpe(name: str, tmp_path: Path) -> None:
    cfg = reduced(METHOD.preset(name))
    assert cfg.model.text.tokenizer == "clip-bpe" and cfg.model.vision.extra_tokens == SPEC[name][5]
    result = one_step(METHOD, cfg, load_tokenizer(cfg), tmp_path)
    assert math.isfinite(result.loss) and result.loss > 0
    assert any(n.endswith("mixture.k_proj") for n in result.changed)
