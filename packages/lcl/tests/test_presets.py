"""Every LCL preset names its real components and builds: full size on the meta device with the parameter
counts of the released configs (spec section 1.7, from a run of the official code) and of OpenCLIP's towers
(built here with open_clip), and one real training step of a reduced copy on CPU."""

from __future__ import annotations

import pytest
import torch
from vlp_lcl import METHOD
from vlp_lcl.presets import PRESETS

from vlp_core.convert.archs import CLIP_MEAN, CLIP_STD
from vlp_core.testing.presets import build_on_meta, count_parameters, load_tokenizer, one_step, reduced, shapes_samples

# Model + loss parameters at full size. Paper presets: the official configs (spec 1.7 gives 177.66M and
# 249.92M; the MMC4 config is the B/32 one with 2048 positions). Demos: no external reference (regression).
EXPECTED_PARAMS = {
    "lcl_b32_laion": 177_659_905,
    "lcl_b16_laion": 249_924_097,
    "lcl_b32_mmc4": 177_659_905 + (2048 - 128) * 512,
    "demo": 723_393, "demo_gen_only": 723_393, "demo_docs": 723_393, "smoke": 67_041,
}
# Spec section 1.7 (millions, rounded to 0.01): total, ViT without proj, LM trunk + token/pos emb + text_proj,
# attentive pooling, LM head.
SPEC_TABLE = {
    "lcl_b32_laion": (177.66, 87.46, 63.46, 1.45, 25.30),
    "lcl_b16_laion": (249.92, 85.80, 123.81, 2.37, 37.95),
}
# (open_clip model for the ViT, LM width, heads, context) of each released config.
RELEASED = {
    "lcl_b32_laion": ("ViT-B-32", 512, 8, 128),
    "lcl_b16_laion": ("ViT-B-16", 768, 12, 280),
    "lcl_b32_mmc4": ("ViT-B-32", 512, 8, 2048),
}
VOCAB = 49408 + 3  # CLIP BPE + <img_placehold>, <start_of_img>, <end_of_img> (spec 1.5)


def test_every_preset_has_an_expected_count():
    assert set(EXPECTED_PARAMS) == set(PRESETS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_on_meta(name):
    model, loss = build_on_meta(METHOD, name)
    assert count_parameters(model, loss) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", list(RELEASED))
def test_paper_preset_components_and_reference_counts(name):
    open_clip = pytest.importorskip("open_clip")
    vit_name, width, heads, context = RELEASED[name]
    cfg = METHOD.preset(name)
    v, t = cfg.model.vision, cfg.model.text
    # Spec 1.2: the standard OpenCLIP ViT (ln_pre, nn.GELU, class token, eps 1e-5); 1.4-1.5: OpenCLIP's text
    # transformer as the LM over CLIP BPE + 3 image-span tokens.
    assert (v.image_size, v.width, v.depth, v.heads, v.act, v.pre_norm, v.norm_eps, v.class_token) == (
        224, 768, 12, 12, "gelu", True, 1e-5, True)
    assert (v.image_mean, v.image_std, v.interpolation) == (CLIP_MEAN, CLIP_STD, "bicubic")
    assert (t.kind, t.tokenizer, t.vocab_size, t.context_length, t.width, t.depth, t.heads) == (
        "clip", "clip-bpe", 0, context, width, 12, heads)
    assert (t.causal, t.act, t.norm_eps, cfg.model.embed_dim, cfg.loss.pool_heads) == (
        True, "gelu", 1e-5, width, heads)

    model, loss = build_on_meta(METHOD, name)
    assert model.lm.tower.token_embedding.weight.shape[0] == VOCAB
    ref = open_clip.create_model(vit_name, device="meta")
    assert isinstance(ref.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    ref_vit = count_parameters(ref.visual) - ref.visual.proj.numel()  # LCL deletes the ViT's projection
    assert v.patch_size == ref.visual.conv1.kernel_size[0]
    with torch.device("meta"):
        ref_lm = open_clip.transformer.TextTransformer(context_length=context, vocab_size=VOCAB, width=width,
                                                       heads=heads, layers=12, output_dim=width)
    # Attentive pooling (spec 1.3): query [768], LN q/k/v, q/k/v 768 -> D bias-free + 3 bias vectors, proj D x D.
    ref_pool = 768 + 3 * 2 * 768 + 3 * (768 * width + width) + width * width
    ref_head = 2 * width + width * VOCAB  # LayerNorm + Linear(D -> V, no bias)
    ours = (count_parameters(model.visual), count_parameters(model.lm) + model.text_projection.numel(),
            count_parameters(model.pool), count_parameters(model.lm_head))
    assert ours == (ref_vit, count_parameters(ref_lm), ref_pool, ref_head)
    assert count_parameters(loss) == 1  # logit_scale
    assert count_parameters(model, loss) == sum(ours) + 1 == EXPECTED_PARAMS[name]
    if name in SPEC_TABLE:
        assert [round(n / 1e6, 2) for n in (sum(ours) + 1, *ours)] == list(SPEC_TABLE[name])


def _documents(n: int) -> list[dict]:
    from vlp_core.data.synthetic import make_document

    return [make_document(0, i, image_size=64) for i in range(n)]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_one_training_step(name, tmp_path):
    full = METHOD.preset(name)
    documents = name == "lcl_b32_mmc4" or name.startswith(("demo", "smoke"))
    # Room for the image spans (4 patches + 3 span tokens each) and some text; documents hold 2-4 images.
    cfg = reduced(full, context_length=64 if documents else 24)
    cfg.loss.pool_heads = 2  # the pooling's head count follows the reduced width
    tok = load_tokenizer(cfg)  # clip-bpe (offline) for the paper presets, the world's tokenizer for demos
    if name in RELEASED:
        assert tok.vocab_size + 3 == VOCAB
    samples = shapes_samples(cfg.train.batch_size)
    if documents:  # MMC4 runs read documents; the demos mix pairs and documents
        samples = _documents(cfg.train.batch_size) if name == "lcl_b32_mmc4" else samples[:2] + _documents(2)
        for i, s in enumerate(samples):
            s["__key__"] = f"{i:08d}"
    # Without the contrastive term (lambda = 0) its own parts get exactly zero gradient.
    contrastive_only = ("text_projection", "ln_final", "pool.q", "pool.k", "pool.norm_q", "pool.norm_k",
                        "logit_scale")
    gen_only = cfg.loss.contrastive_weight == 0
    result = one_step(METHOD, cfg, tok, tmp_path, samples=samples, allow_unchanged=contrastive_only if gen_only else ())
    assert result.parts["loss_gen"] > 0
    assert result.parts["pairs"] >= 1  # some image had preceding context: the contrastive term ran
    assert "model.lm_head.1.weight" in result.changed
    assert ("model.pool.query" in result.zero_grad) == gen_only
