"""Every CLIP/SigLIP preset names its real components and builds: full size on the meta device with the
parameter count of the reference implementation (OpenCLIP, transformers), and one real training step of a
reduced copy on CPU (vlp_core.testing.presets)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from vlp_core.clip import METHOD
from vlp_core.clip.presets import PRESETS
from vlp_core.convert.archs import CLIP_MEAN, CLIP_STD, openai_clip_config
from vlp_core.testing.presets import (
    TokenizerSpec,
    build_on_meta,
    count_parameters,
    load_tokenizer,
    one_step,
    parameter_shapes,
    reduced,
    tiny_tokenizer,
)

# Model + loss parameters at full size. Reference: the count of the reference model built in the tests below
# (open_clip ViT-B-32 incl. logit_scale; transformers SiglipModel incl. logit_scale/bias). The shapes-world
# demos have no external reference: their numbers guard against unnoticed changes (vocabulary = the shapes
# world's word-level tokenizer).
EXPECTED_PARAMS = {
    "vit_b32": 151_277_313,  # open_clip.create_model("ViT-B-32")
    "siglip_b16": 203_155_970,  # transformers SiglipModel(SiglipConfig()) = google/siglip-base-patch16-224
    "demo": 665_153,
    "siglip_demo": 665_154,  # + the SigLIP bias
    "smoke": 38_817,
}
# google/siglip-base-patch16-224's tokenizer ids: <pad> 0, </s> 1 (EOS, and the pad the model was trained
# with), <unk> 2; no BOS.
SIGLIP_TOKENIZER = TokenizerSpec(vocab_size=32000, pad_id=1, eot_id=1)


def test_every_preset_has_an_expected_count():
    assert set(EXPECTED_PARAMS) == set(PRESETS)


@pytest.mark.parametrize("name", [n for n in EXPECTED_PARAMS if n != "siglip_b16"])
def test_preset_parameter_count_on_meta(name):
    model, loss = build_on_meta(METHOD, name)
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model, loss) == EXPECTED_PARAMS[name]


def test_vit_b32_is_open_clip_vit_b32():
    open_clip = pytest.importorskip("open_clip")
    cfg = METHOD.preset("vit_b32")
    v, t = cfg.model.vision, cfg.model.text
    assert (v.timm_name, v.image_size, v.patch_size, v.width, v.depth, v.heads, v.mlp_ratio) == (
        "", 224, 32, 768, 12, 12, 4.0)
    assert (v.pre_norm, v.norm_eps, v.act, v.class_token, v.extra_tokens, v.pool, v.stem) == (
        True, 1e-5, "gelu", True, 0, "token", "patch")
    assert (v.image_mean, v.image_std, v.interpolation) == (CLIP_MEAN, CLIP_STD, "bicubic")
    assert (t.kind, t.tokenizer, t.vocab_size, t.context_length, t.width, t.depth, t.heads) == (
        "clip", "clip-bpe", 49408, 77, 512, 12, 8)
    assert (t.causal, t.pool, t.act, t.norm_eps) == (True, "eot", "gelu", 1e-5)
    assert (cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj) == (512, "linear", "linear")
    assert cfg.loss.kind == "infonce"
    # One source of truth with the converters.
    assert dataclasses.asdict(cfg.model) == dataclasses.asdict(openai_clip_config().model)

    ref = open_clip.create_model("ViT-B-32", device="meta")
    assert isinstance(ref.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)  # not QuickGELU
    assert ref.visual.transformer.resblocks[0].ln_1.eps == v.norm_eps
    assert list(ref.visual.preprocess_cfg["mean"]) == v.image_mean
    assert list(ref.visual.preprocess_cfg["std"]) == v.image_std
    assert ref.visual.preprocess_cfg["interpolation"] == v.interpolation
    assert ref.context_length == t.context_length and ref.vocab_size == t.vocab_size

    model, loss = build_on_meta(METHOD, cfg)
    assert count_parameters(model, loss) == count_parameters(ref) == EXPECTED_PARAMS["vit_b32"]
    # Same tensors up to layout: every parameter shape appears as often (q/k/v fused in both). OpenCLIP stores
    # the projections as [W, E] matrices; we store Linear weights [E, W].
    assert parameter_shapes(model, loss, transpose=[(512, 768)]) == parameter_shapes(ref, transpose=[(512, 768)])


def test_siglip_b16_is_transformers_siglip_base_patch16_224():
    from transformers import SiglipConfig, SiglipModel

    cfg = METHOD.preset("siglip_b16")
    v, t = cfg.model.vision, cfg.model.text
    ref_cfg = SiglipConfig()
    rv, rt = ref_cfg.vision_config, ref_cfg.text_config
    # transformers' defaults are google/siglip-base-patch16-224 (its published config.json).
    assert (rv.hidden_size, rv.num_hidden_layers, rv.num_attention_heads, rv.intermediate_size, rv.patch_size,
            rv.image_size, rv.layer_norm_eps, rv.hidden_act) == (768, 12, 12, 3072, 16, 224, 1e-6,
                                                                   "gelu_pytorch_tanh")
    assert (rt.hidden_size, rt.num_hidden_layers, rt.num_attention_heads, rt.intermediate_size, rt.vocab_size,
            rt.max_position_embeddings, rt.layer_norm_eps, rt.hidden_act) == (768, 12, 12, 3072, 32000, 64, 1e-6,
                                                                               "gelu_pytorch_tanh")
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads, int(v.width * v.mlp_ratio)) == (
        rv.image_size, rv.patch_size, rv.hidden_size, rv.num_hidden_layers, rv.num_attention_heads,
        rv.intermediate_size)
    assert (v.class_token, v.pool, v.act, v.norm_eps, v.pre_norm) == (False, "map", "gelu_tanh", 1e-6, False)
    assert (v.image_mean, v.image_std, v.interpolation) == ([0.5] * 3, [0.5] * 3, "bilinear")
    assert (t.tokenizer, t.vocab_size, t.context_length, t.width, t.depth, t.heads) == (
        "google/siglip-base-patch16-224", rt.vocab_size, rt.max_position_embeddings, rt.hidden_size,
        rt.num_hidden_layers, rt.num_attention_heads)
    assert (t.causal, t.mask_pads, t.pool, t.act, t.norm_eps) == (False, False, "last", "gelu_tanh", 1e-6)
    assert (cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj) == (768, "none", "linear_bias")
    assert cfg.loss.kind == "siglip"
    assert cfg.loss.siglip_init_logit_scale == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert cfg.loss.siglip_init_bias == -10.0

    with torch.device("meta"):
        ref = SiglipModel(ref_cfg)
    model, loss = build_on_meta(METHOD, cfg, tokenizer=SIGLIP_TOKENIZER)
    assert count_parameters(model, loss) == count_parameters(ref) == EXPECTED_PARAMS["siglip_b16"]
    # Part by part: image tower incl. MAP head; text tower + its linear head; scale and bias.
    assert count_parameters(model.visual) == count_parameters(ref.vision_model)
    assert count_parameters(model.text) + count_parameters(model.text_proj) == count_parameters(ref.text_model)
    assert count_parameters(loss) == 2


def _step_tokenizer(cfg, tmp_path):
    name = cfg.model.text.tokenizer
    if name == "google/siglip-base-patch16-224":  # sentencepiece from the hub: a local Unigram of that kind
        return load_tokenizer(cfg, tiny_tokenizer(tmp_path / "tok", kind="unigram", specials=("</s>", "<unk>")))
    assert name in ("clip-bpe", ""), name  # offline: OpenAI's BPE, or the shapes world's word tokenizer
    return load_tokenizer(cfg)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_one_training_step(name, tmp_path):
    full = METHOD.preset(name)
    cfg = reduced(full)
    tok = _step_tokenizer(cfg, tmp_path)
    result = one_step(METHOD, cfg, tok, tmp_path)
    assert result.loss > 0
    assert result.batch["images"].shape[-1] == cfg.model.vision.image_size
    if full.model.text.tokenizer == "clip-bpe":
        assert tok.vocab_size == 49408 and result.batch["tokens"][0, 0] == 49406
    if full.loss.kind == "siglip":
        assert result.parts["logit_bias"] == pytest.approx(full.loss.siglip_init_bias)
        assert result.parts["logit_scale"] == pytest.approx(10.0)
    assert "loss.loss.logit_scale" in result.changed
