"""TensorBoard images of the grouping maps: each text's patch weights over its own image."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.logging.writer import caption_grid
from vlp_core.losses import normalize_features
from vlp_dreamlip.loss import grouping_weights

__all__ = ["grouping_maps", "visualize"]


def grouping_maps(model: nn.Module, images_BCHW: torch.Tensor, tokens_BTL: torch.Tensor,
                  sigma: float = 0.0) -> torch.Tensor:
    """The SGL patch weights as maps [B, T, gh, gw] (each sums to one), as the loss computes them."""
    _, patches_BND = model.encode_image_patches(images_BCHW)
    t_BTD = normalize_features(model.encode_texts(tokens_BTL))
    w_BTN = grouping_weights(t_BTD, normalize_features(patches_BND), sigma)
    gh, gw = model.visual.grid_size
    return w_BTN.view(*w_BTN.shape[:2], gh, gw)


def visualize(model: nn.Module, loss: nn.Module, batch: dict[str, Any], *,
              max_images: int = 4) -> dict[str, np.ndarray]:
    """``MethodSpec.visualize``: one row per image: the image, then each text's map (bright = high weight)."""
    images = batch["images"][:max_images]
    n = images.shape[0]
    sigma = getattr(getattr(loss, "cfg", None), "sgl_sigma", 0.0)
    maps_BTHW = grouping_maps(model, images, batch["tokens"][:n], sigma).float()
    b, t = maps_BTHW.shape[:2]
    heat = F.interpolate(maps_BTHW, size=images.shape[-2:], mode="nearest")
    heat = heat / heat.flatten(2).amax(-1).clamp_min(1e-12)[..., None, None]  # [B, T, H, W] in [0, 1]
    lo = images.flatten(1).amin(1)[:, None, None, None]
    hi = images.flatten(1).amax(1)[:, None, None, None]
    img01 = ((images.float() - lo) / (hi - lo + 1e-6))  # [B, 3, H, W]
    overlays = img01[:, None] * (0.15 + 0.85 * heat[:, :, None])  # [B, T, 3, H, W]
    tiles = torch.cat([img01[:, None], overlays], dim=1).flatten(0, 1)
    tiles = (tiles.clamp(0, 1) * 255).to(torch.uint8).cpu()
    texts = batch.get("subcaptions") or [[f"text {j}" for j in range(t)] for _ in range(b)]
    captions = [c for i in range(b) for c in ["(image)", *texts[i][:t]]]
    return {"dreamlip/grouping_maps": caption_grid(tiles, captions, columns=t + 1, max_items=len(captions),
                                                   tile=96)}
