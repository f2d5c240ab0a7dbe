"""Configurable preprocessing: normalisation statistics and resize interpolation.

References: torchvision's own v2 ops, and open_clip's PIL-based eval transform (an independent pipeline:
PIL resizes, ours resizes uint8 tensors; the two agree to one grey level).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

from vlp_core.data.adapters import ImageTextAdapter
from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD, build_transform, prepare_images
from vlp_core.train.loop import _to_device

SIGLIP = (0.5, 0.5, 0.5)


def _image(h: int = 43, w: int = 57, seed: int = 0) -> Image.Image:
    """A gradient with noise: smooth enough that resampling kernels matter, not a constant."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None] * 255
    arr = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _uint8_batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_default_normalisation_is_unchanged_clip() -> None:
    x = _uint8_batch()
    # The formula the code used before statistics became configurable, bit for bit.
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    assert torch.equal(prepare_images(x, "cpu"), (x.float() - mean) / std)
    assert torch.equal(prepare_images(x, "cpu", mean=list(CLIP_MEAN), std=list(CLIP_STD)), (x.float() - mean) / std)


def test_siglip_statistics() -> None:
    x = _uint8_batch(1)
    got = prepare_images(x, "cpu", torch.float64, mean=SIGLIP, std=SIGLIP)
    torch.testing.assert_close(got, (x.double() / 255 - 0.5) / 0.5, rtol=0, atol=1e-12)
    assert got.min() >= -1 and got.max() <= 1
    # torchvision's Normalize on [0, 1] floats agrees.
    ref = v2.Normalize(mean=SIGLIP, std=SIGLIP)(x.float() / 255)
    torch.testing.assert_close(prepare_images(x, "cpu", mean=SIGLIP, std=SIGLIP), ref, rtol=0, atol=1e-6)
    # The cache is keyed by the statistics: CLIP's are still CLIP's after SigLIP's were used.
    assert not torch.allclose(prepare_images(x, "cpu"), ref)
    # Float input is only cast, never normalised twice.
    f = torch.rand(1, 3, 2, 2)
    assert torch.equal(prepare_images(f, "cpu", mean=SIGLIP, std=SIGLIP), f)


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [((0.5, 0.5), SIGLIP, "image_mean"), (SIGLIP, (0.5, 0.0, 0.5), "positive"), ("abc", SIGLIP, "image_mean"),
     (SIGLIP, (0.5, float("nan"), 0.5), "image_std")],
)
def test_bad_statistics_are_one_line_errors(mean, std, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_images(_uint8_batch(), "cpu", mean=mean, std=std)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resize_matches_torchvision(mode: str) -> None:
    img = _image()
    want = v2.Compose([v2.PILToTensor(), v2.Resize(24, interpolation=InterpolationMode(mode), antialias=True),
                       v2.CenterCrop(24)])(img)
    got = build_transform(24, interpolation=mode)(img)
    assert got.dtype == torch.uint8 and got.shape == (3, 24, 24)
    assert torch.equal(got, want)


def test_default_transform_is_unchanged_bilinear() -> None:
    img = _image(seed=3)
    before = v2.Compose([v2.PILToTensor(), v2.Resize(20, antialias=True), v2.CenterCrop(20)])
    assert torch.equal(build_transform(20)(img), before(img))


def test_bicubic_differs_from_bilinear_and_tracks_open_clip() -> None:
    open_clip_transform = pytest.importorskip("open_clip.transform").image_transform
    img = _image(seed=1)
    ours = {m: build_transform(24, interpolation=m)(img) for m in ("bilinear", "bicubic")}
    assert (ours["bilinear"].int() - ours["bicubic"].int()).abs().max() >= 3
    for mode in ("bilinear", "bicubic"):
        ref = open_clip_transform(24, is_train=False, mean=SIGLIP, std=SIGLIP, interpolation=mode)(img)
        got = prepare_images(ours[mode][None], "cpu", mean=SIGLIP, std=SIGLIP)[0]
        levels = (got - ref).abs() * 0.5 * 255  # back to grey levels
        assert levels.max() <= 1.0 + 1e-4, mode
    other = prepare_images(ours["bilinear"][None], "cpu", mean=SIGLIP, std=SIGLIP)[0]
    ref = open_clip_transform(24, is_train=False, mean=SIGLIP, std=SIGLIP, interpolation="bicubic")(img)
    assert (other - ref).abs().max() * 0.5 * 255 > 2  # the wrong mode is visibly off


def test_augment_uses_the_interpolation() -> None:
    img = _image(seed=2)
    torch.manual_seed(5)
    got = build_transform(16, train=True, augment=True, interpolation="bicubic")(img)
    torch.manual_seed(5)
    want = v2.Compose([v2.PILToTensor(), v2.RandomResizedCrop(16, scale=(0.8, 1.0),
                                                               interpolation=InterpolationMode.BICUBIC,
                                                               antialias=True)])(img)
    assert torch.equal(got, want)


def test_unknown_interpolation() -> None:
    with pytest.raises(ValueError, match="nearest"):
        build_transform(16, interpolation="nearest")


def test_adapter_and_train_loop_use_the_config() -> None:
    import io

    buf = io.BytesIO()
    _image(seed=4).save(buf, format="PNG")
    sample = {"__key__": "k", "png": buf.getvalue(), "txt": b"a cat", "__seed__": 1}
    adapter = ImageTextAdapter(lambda texts: torch.zeros(len(texts), 4, dtype=torch.long), image_size=16,
                               interpolation="bicubic")
    img = adapter(sample)["images"]
    assert torch.equal(img, build_transform(16, interpolation="bicubic")(_image(seed=4)))
    assert not torch.equal(img, build_transform(16)(_image(seed=4)))
    batch = adapter.collate([adapter(sample)])
    moved = _to_device(batch, torch.device("cpu"), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    torch.testing.assert_close(moved["images"], (batch["images"].float() / 255 - 0.5) / 0.5, rtol=0, atol=1e-6)
    assert torch.equal(_to_device(batch, torch.device("cpu"))["images"], prepare_images(batch["images"], "cpu"))
    assert moved["texts"] == ["a cat"]
