"""Pretrained vision towers: a vlp run's tower and Hugging Face CLIP weights load through vision.pretrained."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from vlp_llm2clip.export import convert_hf_clip_vision

from vlp_core.models.pretrained import apply_state_dict, select_prefix
from vlp_core.models.vit import VisionTower


def test_hf_clip_vision_converts_to_an_identical_timm_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8)).eval()
    trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                              pre_norm=True, class_token=True, num_classes=0, global_pool="token",
                              fc_norm=False, act_layer="quick_gelu",  # pre_norm: no patch bias
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))  # CLIP's eps
    tower = VisionTower(trunk, pool="token")
    sd = select_prefix(convert_hf_clip_vision(hf.state_dict()), "trunk.")
    apply_state_dict(tower.trunk, sd, strict=True)  # every key, every shape
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(images).pooled, hf(pixel_values=images).pooler_output,
                                   atol=1e-5, rtol=1e-4)


def test_vlp_run_tower_export_loads_through_vision_pretrained(tmp_path):
    from vlp_llm2clip.export import export_vision_tower

    from vlp_core.clip import METHOD as CLIP
    from vlp_core.models.vit import build_vision_tower
    from vlp_core.train.loop import TrainStep

    cfg = CLIP.preset("smoke")
    step = TrainStep(CLIP.build_model(cfg, type("T", (), {"vocab_size": 50, "pad_id": 0})()), CLIP.build_loss(cfg))
    torch.save({"step": 1, "model": step.state_dict(), "config": {}}, tmp_path / "step_1.pt")
    out = export_vision_tower(tmp_path / "step_1.pt", tmp_path / "tower.safetensors")
    cfg.model.vision.pretrained = str(out)
    tower = build_vision_tower(cfg.model.vision)
    for name, value in step.model.visual.state_dict().items():
        assert torch.equal(tower.state_dict()[name], value), name
