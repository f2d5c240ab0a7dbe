"""Image decoding and transforms.

Workers decode to **uint8** ``[3, H, W]`` tensors; conversion to float and normalisation happen on the
device in :func:`prepare_images` (a quarter of the host-to-device traffic, and no float work on the CPU
workers). The per-channel statistics and the resize interpolation are configuration
(``model.vision.image_mean``/``image_std``/``interpolation``); the defaults are CLIP's statistics and
bilinear resizing.

Shape legend:
    B: batch    H, W: image height and width    S: output side
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "decode_image",
    "build_transform",
    "prepare_images",
    "interpolation_mode",
    "normalize_stats",
    "CLIP_MEAN",
    "CLIP_STD",
    "INTERPOLATIONS",
    "ImageDecodeError",
    "set_max_image_pixels",
    "max_image_pixels",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Resize interpolations accepted by ``build_transform`` (the ``model.vision.interpolation`` choices).
INTERPOLATIONS: dict[str, InterpolationMode] = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class ImageDecodeError(ValueError):
    pass


# PIL's own limit at import time: what ``data.max_image_pixels=0`` restores.
_PIL_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
_max_pixels = 0  # see set_max_image_pixels


def set_max_image_pixels(limit: int) -> None:
    """Skip images whose header declares more than ``limit`` pixels (``data.max_image_pixels``); 0 = PIL's
    own ``Image.MAX_IMAGE_PIXELS`` only.

    A process-wide setting because the adapters that decode are the methods' own: the training pipeline sets
    it in every process that decodes (its data loader workers, or the trainer itself with ``workers=0``).
    PIL's limit follows, so that a cap above PIL's default is not cut short by PIL's own bomb check, and one
    below it is also applied on the formats that check again while loading.
    """
    global _max_pixels
    _max_pixels = max(int(limit), 0)
    Image.MAX_IMAGE_PIXELS = _max_pixels or _PIL_MAX_PIXELS


def max_image_pixels() -> int:
    """The pixel cap :func:`decode_image` applies (0: PIL's own limit only)."""
    return _max_pixels


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image, raising :class:`ImageDecodeError` on anything undecodable.

    The size is checked from the header before any pixel is decoded (``Image.open`` reads only the header):
    an image over the cap (:func:`set_max_image_pixels`) or that PIL considers a decompression bomb raises
    ``ImageDecodeError`` without allocating its pixels, so a 20000 x 20000 PNG of a few hundred bytes costs
    nothing. Without a cap PIL's ``DecompressionBombWarning`` is an error here: past PIL's limit nothing is
    decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not _max_pixels:  # else PIL's limit is the cap, checked below with a clearer message
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if _max_pixels and width * height > _max_pixels:
                raise ImageDecodeError(f"image of {width} x {height} = {width * height} pixels is over "
                                       f"data.max_image_pixels={_max_pixels}")
            img.load()
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(str(e) or type(e).__name__) from e
    except Exception as e:  # hostile files reach PIL's decoders' other errors (EOFError, struct.error...)
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def interpolation_mode(name: str) -> InterpolationMode:
    """The torchvision mode for an interpolation name (``"bilinear"`` or ``"bicubic"``)."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"unknown image interpolation {name!r}; choose one of {sorted(INTERPOLATIONS)}") from None


def build_transform(
    image_size: int, *, train: bool = False, augment: bool = False, interpolation: str = "bilinear"
) -> v2.Compose:
    """PIL image -> uint8 ``[3, S, S]``: resize the short side to ``S`` then centre-crop, antialiased, with
    ``interpolation``. Training with ``augment`` uses RandomResizedCrop(0.8, 1) with the same interpolation."""
    mode = interpolation_mode(interpolation)
    if train and augment:
        ops = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), interpolation=mode, antialias=True)]
    else:
        ops = [v2.Resize(image_size, interpolation=mode, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.PILToTensor(), *ops])


def normalize_stats(
    mean: Sequence[float], std: Sequence[float]
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Validated per-channel ``(mean, std)`` tuples in [0, 1] units; raises ``ValueError`` on bad values."""
    out = []
    for name, values in (("image_mean", mean), ("image_std", std)):
        try:
            vals = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be 3 numbers, got {values!r}") from None
        if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"{name} must be 3 finite numbers (one per RGB channel), got {values!r}")
        if name == "image_std" and min(vals) <= 0:
            raise ValueError(f"image_std must be positive, got {values!r}")
        out.append(vals)
    return out[0], out[1]  # type: ignore[return-value]


_STATS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def prepare_images(
    images: torch.Tensor,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` (any device) -> ``(x / 255 - mean) / std`` in ``dtype`` on ``device``.

    ``mean``/``std`` are per-channel, in [0, 1] units (CLIP's by default; SigLIP uses 0.5 and 0.5). Float
    input is only moved and cast. The statistics tensors are cached per (device, dtype, mean, std).
    """
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images.to(dtype)
    mean_t, std_t = normalize_stats(mean, std)
    key = (device, dtype, mean_t, std_t)
    if key not in _STATS:
        mean_1C11 = torch.tensor(mean_t, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        std_1C11 = torch.tensor(std_t, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        _STATS[key] = (mean_1C11, std_1C11)
    mean_1C11, std_1C11 = _STATS[key]
    return (images.to(dtype) - mean_1C11) / std_1C11
