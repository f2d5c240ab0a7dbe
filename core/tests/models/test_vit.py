"""Vision tower tests: shapes, pooling identities, prefix-token positions, grad checkpointing, timm names.

Shape legend: B batch, P prefix tokens, N patches, D width.
"""

from __future__ import annotations

import pytest
import torch

from vlp_core.config import VisionConfig
from vlp_core.models import VisionOutput, build_vision_tower

TINY = dict(image_size=16, patch_size=4, width=16, depth=2, heads=2, mlp_ratio=2.0)


def _images(b: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("class_token", "extra", "pool"),
    [(True, 0, "token"), (True, 3, "token"), (False, 0, "avg"), (False, 2, "none"), (True, 2, "avg")],
)
def test_shapes(class_token: bool, extra: int, pool: str) -> None:
    tower = build_vision_tower(VisionConfig(**TINY, class_token=class_token, extra_tokens=extra, pool=pool))
    P = int(class_token) + extra
    assert (tower.width, tower.num_prefix_tokens, tower.num_patches) == (16, P, 16)
    assert tower.grid_size == (4, 4) and tower.image_size == 16
    out = tower(_images())
    assert isinstance(out, VisionOutput)
    assert out.pooled.shape == (2, 16)
    assert out.prefix.shape == (2, P, 16)
    assert out.patches.shape == (2, 16, 16)


def test_pooling_identities() -> None:
    tok = build_vision_tower(VisionConfig(**TINY, extra_tokens=2, pool="token"))
    out = tok(_images())
    torch.testing.assert_close(out.pooled, out.prefix[:, 0])
    avg = build_vision_tower(VisionConfig(**TINY, extra_tokens=2, pool="avg"))
    out = avg(_images())
    torch.testing.assert_close(out.pooled, out.patches.mean(dim=1))
    none_no_prefix = build_vision_tower(VisionConfig(**TINY, class_token=False, pool="none"))
    out = none_no_prefix(_images())
    torch.testing.assert_close(out.pooled, out.patches.mean(dim=1))


def test_tokens_are_final_normed_and_match_timm() -> None:
    """prefix ++ patches equals timm's own forward_features, whose last op is the final LayerNorm."""
    tower = build_vision_tower(VisionConfig(**TINY, extra_tokens=2))
    x = _images()
    out = tower(x)
    ref_BTD = tower.trunk.forward_features(x)
    torch.testing.assert_close(torch.cat([out.prefix, out.patches], dim=1), ref_BTD)
    normed = torch.nn.functional.layer_norm(out.patches, (16,))  # default LN params: weight 1, bias 0
    torch.testing.assert_close(out.patches, normed, atol=1e-5, rtol=1e-5)


def test_extra_tokens_have_own_positions() -> None:
    """pos_embed covers class + extra tokens, so each prefix token has a learned position row."""
    tower = build_vision_tower(VisionConfig(**TINY, extra_tokens=3))
    trunk = tower.trunk
    assert not trunk.no_embed_class
    assert trunk.pos_embed.shape == (1, 1 + 3 + 16, 16)
    assert trunk.reg_token.shape == (1, 3, 16)
    # The position row at sequence index 2 belongs to extra token 1: perturbing it must move that token.
    x = _images()
    before = tower(x).prefix.detach().clone()
    with torch.no_grad():
        trunk.pos_embed[:, 2] += 1.0
    after = tower(x).prefix
    assert not torch.allclose(before[:, 2], after[:, 2])


def test_fused_attention_on() -> None:
    tower = build_vision_tower(VisionConfig(**TINY))
    flags = [m.fused_attn for m in tower.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)


def test_grad_checkpointing_same_outputs_and_grads() -> None:
    torch.manual_seed(0)
    tower = build_vision_tower(VisionConfig(**TINY, extra_tokens=1))
    x = _images()

    def run() -> tuple[VisionOutput, list[torch.Tensor]]:
        tower.zero_grad(set_to_none=True)
        out = tower(x)
        (out.pooled.square().sum() + out.patches.sum()).backward()
        return out, [p.grad.clone() for p in tower.parameters()]

    out_a, grads_a = run()
    tower.set_grad_checkpointing(True)
    out_b, grads_b = run()
    torch.testing.assert_close(out_a.pooled, out_b.pooled)
    torch.testing.assert_close(out_a.patches, out_b.patches)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb)


def test_named_timm_model_builds_offline() -> None:
    tower = build_vision_tower(VisionConfig(timm_name="vit_tiny_patch16_224", image_size=32, extra_tokens=2))
    assert (tower.width, tower.num_prefix_tokens, tower.grid_size) == (192, 3, (2, 2))
    out = tower(torch.randn(1, 3, 32, 32))
    assert out.prefix.shape == (1, 3, 192) and out.patches.shape == (1, 4, 192)


def test_errors() -> None:
    with pytest.raises(ValueError, match="class_token"):
        build_vision_tower(VisionConfig(**TINY, class_token=False, pool="token"))
    with pytest.raises(ValueError, match="not a timm model"):
        build_vision_tower(VisionConfig(timm_name="no_such_model_xyz"))
    with pytest.raises(ValueError, match="VisionTransformer"):
        build_vision_tower(VisionConfig(timm_name="resnet18", image_size=32))
    with pytest.raises(ValueError, match="images"):
        build_vision_tower(VisionConfig(**TINY))(torch.randn(1, 3, 8, 8))
