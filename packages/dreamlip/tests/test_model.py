"""The model keeps every text with its own image and projects patches with the pooled token's head."""

from __future__ import annotations

import torch
from vlp_dreamlip import METHOD
from vlp_dreamlip.model import DreamLipModel


def _model(patch_features=True):
    cfg = METHOD.preset("smoke")
    torch.manual_seed(0)
    return DreamLipModel(cfg.model, vocab_size=50, pad_id=0, patch_features=patch_features).eval(), cfg


def test_texts_stay_with_their_image_and_patches_share_the_head():
    model, cfg = _model()
    b, t, length = 3, 4, cfg.model.text.context_length
    tokens = torch.randint(1, 50, (b, t, length), generator=torch.Generator().manual_seed(1))
    images = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model({"images": images, "tokens": tokens})
        assert out["text_features"].shape == (b, t, cfg.model.embed_dim)
        for i in range(b):
            for j in range(t):  # each (image, slot) text encoded on its own gives the same row
                assert torch.allclose(out["text_features"][i, j], model.encode_text(tokens[i, j][None])[0],
                                      atol=1e-5)
        vis = model.visual(images)
        assert torch.allclose(out["patch_features"], model.image_proj(vis.patches), atol=1e-6)
        assert torch.allclose(out["image_features"], model.encode_image(images), atol=1e-6)
        assert out["patch_features"].shape == (b, model.visual.num_patches, cfg.model.embed_dim)


def test_without_sgl_no_patch_features():
    model, _ = _model(patch_features=False)
    out = model({"images": torch.randn(2, 3, 32, 32), "tokens": torch.randint(1, 50, (2, 1, 16))})
    assert set(out) == {"image_features", "text_features"}


def test_trimmed_padding_gives_the_same_text_features():
    """The adapter cuts tokens to the batch's longest text: exact for the causal tower with EOT pooling."""
    model, cfg = _model()
    tokens = torch.zeros(2, 3, cfg.model.text.context_length, dtype=torch.long)
    tokens[..., :5] = torch.randint(1, 50, (2, 3, 5), generator=torch.Generator().manual_seed(3))
    tokens[0, 1, 5:9] = 7  # the longest text: 9 tokens
    with torch.no_grad():
        assert torch.allclose(model.encode_texts(tokens), model.encode_texts(tokens[..., :9]), atol=1e-6)
