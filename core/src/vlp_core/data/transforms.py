"""Image decoding and transforms.

Workers decode to **uint8** ``[3, H, W]`` tensors; conversion to float and normalisation happen on the
device in :func:`prepare_images` (a quarter of the host-to-device traffic, and no float work on the CPU
workers).
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

__all__ = ["decode_image", "build_transform", "prepare_images", "CLIP_MEAN", "CLIP_STD", "ImageDecodeError"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageDecodeError(ValueError):
    pass


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes to an RGB PIL image, raising :class:`ImageDecodeError` on anything undecodable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(str(e)) from e


def build_transform(image_size: int, *, train: bool = False, augment: bool = False) -> v2.Compose:
    """PIL image -> uint8 ``[3, S, S]``. Training with ``augment`` uses RandomResizedCrop(0.8, 1)."""
    if train and augment:
        ops = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
    else:
        ops = [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([v2.PILToTensor(), *ops])


_STATS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def prepare_images(images: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32):
    """uint8 ``[B, 3, H, W]`` (any device) -> normalised float on ``device``; float input is only moved."""
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    if images.dtype != torch.uint8:
        return images.to(dtype)
    key = (device, dtype)
    if key not in _STATS:
        mean = torch.tensor(CLIP_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        std = torch.tensor(CLIP_STD, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        _STATS[key] = (mean, std)
    mean, std = _STATS[key]
    return (images.to(dtype) - mean) / std
