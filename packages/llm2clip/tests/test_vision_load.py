"""The presets' vision towers load EVA02 (timm, OpenCLIP, EVA-CLIP / LLM2CLIP layouts) and OpenAI (QuickGELU)
weights and then equal their timm / open_clip references (small configs, random weights, within 1e-5 x max|ref|).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from vlp_llm2clip import METHOD
from vlp_llm2clip.model import build_tower

from vlp_core.testing.presets import reduced

EVA_SIZES = dict(depth=2, embed_dim=64, num_heads=2)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    tol = 1e-5 * float(ref.abs().max())
    torch.testing.assert_close(got, ref, atol=tol, rtol=0)


def _eva_clip_layout(timm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Eva keys -> EVA-CLIP's own (``visual.*``, q/v biases, SwiGLU w1/w2/w3, sub-LNs), as in the EVA02-CLIP
    and LLM2CLIP-EVA02 releases, plus the text side, the scale and EVA-CLIP's RoPE buffers that must be ignored."""
    renames = [(".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."), (".mlp.fc2.", ".mlp.w3."),
               (".mlp.norm.", ".mlp.ffn_ln."), (".attn.norm.", ".attn.inner_attn_ln."),
               (".attn.q_proj.bias", ".attn.q_bias"), (".attn.v_proj.bias", ".attn.v_bias")]
    out = {}
    for k, v in timm_sd.items():
        for a, b in renames:
            k = k.replace(a, b)
        out[f"visual.{k}"] = v
    out["visual.rope.freqs_cos"] = torch.randn(4, 16)
    out["visual.rope.freqs_sin"] = torch.randn(4, 16)
    out["text.text_adaptor.0.fn.0.weight"] = torch.randn(8, 4)  # LLM2CLIP's adapter: not a vision key
    out["logit_scale"] = torch.tensor(4.6)
    return out


@pytest.fixture(scope="module")
def eva_reference():
    import timm

    torch.manual_seed(0)
    cfg = reduced(METHOD.preset("eva02_l14_336"), **{"width": 64, "depth": 2, "heads": 2})
    ref = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=24,
                            img_size=cfg.model.vision.image_size, **EVA_SIZES).eval()
    with torch.no_grad():  # random (not default-initialised) norms and biases, so every tensor matters
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, ref


@pytest.mark.parametrize("layout", ["timm", "eva_clip", "open_clip"])
def test_eva02_tower_equals_timm_after_loading(eva_reference, tmp_path, layout):
    cfg, ref = eva_reference
    assert cfg.model.vision.timm_name == "eva02_large_patch14_clip_336" and cfg.model.vision.timm_kwargs == EVA_SIZES
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    if layout == "eva_clip":
        sd = _eva_clip_layout(sd)
        path = tmp_path / "LLM2CLIP-EVA02-tiny.pt"
        torch.save(sd, path)
    else:
        if layout == "open_clip":
            head = sd.pop("head.weight")
            sd.pop("head.bias")
            sd = {f"visual.trunk.{k}": v for k, v in sd.items()}
            sd["visual.head.proj.weight"] = head
        path = tmp_path / "tower.safetensors"
        save_file(sd, str(path))
    cfg.model.vision.pretrained = str(path)
    tower = build_tower(cfg.model.vision).eval()
    images = torch.randn(2, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(images), pre_logits=True)  # normed class token
        _close(tower(images).pooled, want)


def test_openai_tower_is_quickgelu_and_equals_open_clip(tmp_path):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    cfg = reduced(METHOD.preset("openai_l14_224"), width=64, depth=2, heads=2)
    v = cfg.model.vision
    assert (v.timm_name, v.act, v.pre_norm, v.norm_eps, v.pool, v.class_token) == ("", "quick_gelu", True, 1e-5,
                                                                                   "token", True)
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(
        embed_dim=48, quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=14, image_size=v.image_size),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = tmp_path / "open_clip_tiny.pt"
    torch.save(ref.state_dict(), path)  # OpenAI layout: visual.conv1, visual.class_embedding, ..., visual.proj
    v.pretrained = str(path)
    tower = build_tower(v).eval()
    images = torch.randn(2, 3, v.image_size, v.image_size)
    with torch.no_grad():
        _close(tower(images).pooled @ ref.visual.proj, ref.encode_image(images))
    # The same weights in a GELU tower differ: the activation is the preset's, not the checkpoint's.
    v.act = "gelu"
    gelu = build_tower(v).eval()
    with torch.no_grad():
        assert not torch.allclose(gelu(images).pooled @ ref.visual.proj, ref.encode_image(images), atol=1e-4)


def test_foreign_weights_are_a_one_line_error(eva_reference, tmp_path):
    _, ref = eva_reference
    path = tmp_path / "eva.safetensors"
    save_file({k: v.clone() for k, v in ref.state_dict().items()}, str(path))
    cfg = reduced(METHOD.preset("openai_l14_224"), width=64, depth=2, heads=2)
    cfg.model.vision.pretrained = str(path)
    with pytest.raises(ValueError, match=r"model.vision.pretrained .*eva.safetensors") as e:
        build_tower(cfg.model.vision)
    assert "\n" not in str(e.value)
