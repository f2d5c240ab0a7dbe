"""Run logging: ``metrics.jsonl`` plus TensorBoard scalars and images (rank 0 only)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["RunWriter", "caption_grid"]


def caption_grid(images_BCHW: torch.Tensor, captions: list[str], *, columns: int = 4, max_items: int = 16,
                 tile: int = 128) -> np.ndarray:
    """Tile uint8 images with their captions written underneath; returns HWC uint8."""
    n = min(len(images_BCHW), max_items, len(captions))
    rows = (n + columns - 1) // columns
    text_h = 40
    canvas = Image.new("RGB", (columns * tile, rows * (tile + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        img = images_BCHW[i]
        if img.dtype != torch.uint8:  # normalised float: rescale for display
            lo, hi = img.min(), img.max()
            img = ((img - lo) / (hi - lo + 1e-6) * 255).to(torch.uint8)
        pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).resize((tile, tile))
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        canvas.paste(pil, (x, y))
        lines = textwrap.wrap(captions[i], width=tile // 6)[:3]
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    return np.asarray(canvas)


class RunWriter:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard; a no-op on ranks other than 0."""

    def __init__(self, folder: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.folder = Path(folder)
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.folder / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.folder / "tensorboard"))

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()}
        assert self._jsonl is not None
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image_HWC: np.ndarray) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_HWC, step, dataformats="HWC")

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
