"""The distributed test case shared by the torchrun worker and the single-process reference.

Global batch of 4 rows split 2 + 2: rank 0 holds two image-first pairs (2 images, 0 contrastive pairs),
rank 1 a 3-image document and a text-first pair (4 images, 3-4 pairs). float64 throughout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from helpers import SENTENCES, document, pair, tiny_cfg
from vlp_lcl import METHOD

from vlp_core.data.tokenizer import Tokenizer
from vlp_core.data.transforms import prepare_images
from vlp_core.train.loop import TrainStep


def build(world: str) -> tuple[TrainStep, Any, list[list[dict]]]:
    """``(float64 TrainStep, an adapter to collate with, rows by rank)``."""
    cfg = tiny_cfg(context_length=96)
    tokenizer = Tokenizer.from_pretrained(f"{world}/tokenizer.json", context_length=96)
    torch.manual_seed(0)
    step = TrainStep(METHOD.build_model(cfg, tokenizer), METHOD.build_loss(cfg)).to(torch.float64)
    cfg.loss = dataclasses.replace(cfg.loss, img_first_prob=1.0)  # the adapter keeps its own config
    image_first = METHOD.build_adapter(cfg, tokenizer)
    cfg.loss = dataclasses.replace(cfg.loss, img_first_prob=0.0)
    text_first = METHOD.build_adapter(cfg, tokenizer)
    rows = [
        [image_first(pair(0)), image_first(pair(1, "a small green star in the center."))],
        [text_first(document(4, SENTENCES[:5], [(0, 1.0), (1, 1.0), (3, 1.0)])),
         text_first(pair(2, "a large white cross at the bottom right."))],
    ]
    return step, image_first, rows


def collate(adapter: Any, rows: list[dict]) -> dict:
    batch = adapter.collate(rows)
    batch["images"] = prepare_images(batch["images"], torch.device("cpu")).to(torch.float64)
    return batch


def grads(step: TrainStep) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in step.named_parameters() if p.grad is not None}
