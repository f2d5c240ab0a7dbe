"""Every ALIP preset names its real components and builds: full size on the meta device with the parameter
count of the reference implementation (the official code is an OpenCLIP fork with OpenCLIP's ``ViT-B-32``
config, built here with open_clip), and one real training step of a reduced copy on CPU."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn
from vlp_alip import METHOD
from vlp_alip.presets import PRESETS

from vlp_core.convert.archs import CLIP_MEAN, CLIP_STD, openai_clip_config
from vlp_core.testing.presets import (
    build_on_meta,
    count_parameters,
    load_tokenizer,
    one_step,
    parameter_shapes,
    reduced,
    shapes_samples,
)

# Model + loss parameters at full size, and where the expected number comes from.
EXPECTED_PARAMS = {
    # open_clip.create_model("ViT-B-32"): ALIP's towers and its one shared logit_scale (spec section 2).
    "alip_b32_yfcc15m": 151_277_313,
    # Shapes-world demos (the CLIP demo's towers + one temperature; no external reference: regression).
    "demo": 665_153,
    "demo_ungated": 665_153,
    "smoke": 38_817,
}
PAPER = ("alip_b32_yfcc15m",)
PROJ = ((512, 768),)  # ViT-B/32's projection shapes, [E, W] in nn.Linear


def test_every_preset_has_an_expected_count():
    assert set(EXPECTED_PARAMS) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_on_meta(name):
    model, loss = build_on_meta(METHOD, name)
    assert count_parameters(model, loss) == EXPECTED_PARAMS[name]


def test_paper_preset_is_openclip_vit_b32_with_clip_bpe():
    open_clip = pytest.importorskip("open_clip")
    cfg = METHOD.preset("alip_b32_yfcc15m")
    v, t = cfg.model.vision, cfg.model.text
    # Spec section 2: OpenCLIP ViT-B/32, nn.GELU (quick_gelu unset), ln_pre, class token; CLIP BPE, 77 tokens.
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads, v.act, v.pre_norm, v.norm_eps) == (
        224, 32, 768, 12, 12, "gelu", True, 1e-5)
    assert (v.class_token, v.pool, v.image_mean, v.image_std) == (True, "token", CLIP_MEAN, CLIP_STD)
    assert v.interpolation == "bilinear"  # the DALI training pipeline (spec section 5)
    assert (t.tokenizer, t.vocab_size, t.context_length, t.width, t.depth, t.heads, t.causal, t.pool, t.act) == (
        "clip-bpe", 49408, 77, 512, 12, 8, True, "eot", "gelu")
    assert (cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj) == (512, "linear", "linear")
    towers = dataclasses.asdict(openai_clip_config(act="gelu").model)
    towers["vision"]["interpolation"] = "bilinear"
    assert dataclasses.asdict(cfg.model) == towers
    assert (cfg.loss.raw_key, cfg.loss.caption_key, cfg.loss.init_temperature, cfg.loss.max_logit_scale) == (
        "txt", "syn.txt", 0.07, 100.0)

    ref = open_clip.create_model("ViT-B-32", device="meta")
    assert isinstance(ref.visual.transformer.resblocks[0].mlp.gelu, nn.GELU)
    model, loss = build_on_meta(METHOD, cfg)
    assert count_parameters(model, loss) == count_parameters(ref) == EXPECTED_PARAMS["alip_b32_yfcc15m"]
    # Same tensors up to layout (projections: OpenCLIP [W, E], ours nn.Linear [E, W]).
    assert parameter_shapes(model, loss, transpose=PROJ) == parameter_shapes(ref, transpose=PROJ)


def _samples(n: int) -> list[dict]:
    """Shapes-world samples with an OFA-style synthetic caption member (``syn.txt``) = the clean caption."""
    import json

    out = shapes_samples(n)
    for s in out:
        s["syn.txt"] = json.loads(s["json"])["clean"]
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_one_training_step(name, tmp_path):
    full = METHOD.preset(name)
    cfg = reduced(full)
    tok = load_tokenizer(cfg)  # clip-bpe (offline) for the paper preset, the world's tokenizer for demos
    if name in PAPER:
        assert tok.vocab_size == 49408 and tok.bos_id == 49406 and tok.eot_id == 49407
    result = one_step(METHOD, cfg, tok, tmp_path, samples=_samples(cfg.train.batch_size))
    assert result.batch["caption_tokens"].shape == result.batch["tokens"].shape
    assert {"loss_xt", "loss_xc"} <= set(result.parts)
    assert "loss.logit_scale" in result.changed
