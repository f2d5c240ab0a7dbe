"""Zero-shot classification: class states from prompt templates, top-1/top-5 accuracy over images.

Shape legend:
    B: batch of images    C: classes    T: prompt templates per class    L: token length
    H, W: image height and width

Ties: a class whose score equals the true class's score is counted fairly, as the expected hit under a
uniformly random order of the tied classes. With ``g`` classes scoring strictly higher and ``t`` others
tied with the true class, the top-K hit is ``clamp(K - g, 0, t + 1) / (t + 1)``. Unlike ``topk`` this
never depends on an arbitrary tie-break (a collapsed model scoring all classes equally gets chance level,
not 100 % or 0 %).

``mean_per_class_recall`` (on request) is CLIP_benchmark's balanced accuracy: the top-1 hit rate of each
class that has images, averaged over those classes (with the same fair ties).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD, prepare_images
from vlp_core.eval.datasets import iter_image_batches
from vlp_core.eval.scorer import (
    all_gather_rows,
    all_reduce_sum,
    autocast_for,
    dist_rank_world,
    evaluating,
    share_bounds,
    to_float,
)
from vlp_core.method import Scorer

__all__ = ["zeroshot_eval", "compute_class_states", "topk_hits"]

Tokenizer = Callable[[list[str]], torch.Tensor]


def topk_hits(scores_BC: torch.Tensor, labels_B: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Expected top-K hits per image with fair ties (see module docstring): float64 ``[len(ks), B]``."""
    true_B1 = scores_BC.gather(1, labels_B.view(-1, 1))
    greater_B = (scores_BC > true_B1).sum(dim=1).double()
    ties_B = (scores_BC == true_B1).sum(dim=1).double() - 1  # the true class always equals itself
    rows = [((k - greater_B).clamp(min=0) / (ties_B + 1)).clamp(max=1) for k in ks]
    return torch.stack(rows)


def compute_class_states(
    scorer: Scorer,
    classnames: list[str],
    templates: list[str],
    tokenizer: Tokenizer,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Class states ``[C, ...]`` in class order, each rank encoding a contiguous block of classes.

    Classes go through ``scorer.class_states`` in chunks of about ``batch_size`` prompts.
    """
    if not classnames or not templates:
        raise ValueError("zero-shot evaluation needs at least one class name and one template")
    rank, world = dist_rank_world()
    start, stop = share_bounds(len(classnames), rank, world)
    per_chunk = max(1, batch_size // len(templates))
    parts: list[torch.Tensor] = []
    for c0 in range(start, stop, per_chunk):
        chunk = classnames[c0 : min(stop, c0 + per_chunk)]
        prompts = [t.format(name) for name in chunk for t in templates]
        tokens_CTL = tokenizer(prompts).to(device).view(len(chunk), len(templates), -1)
        with autocast_for(device, dtype):
            parts.append(to_float(scorer.class_states(tokens_CTL)))
    local = torch.cat(parts) if parts else None
    states = all_gather_rows(local, device)
    assert states is not None and states.shape[0] == len(classnames)
    return states


def zeroshot_eval(
    scorer: Scorer,
    images: Iterable[tuple[torch.Tensor, torch.Tensor]],
    classnames: list[str],
    templates: list[str],
    tokenizer: Tokenizer,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    per_class: bool = False,
) -> dict[str, float]:
    """Zero-shot accuracy of ``scorer`` on this rank's share of ``images``, reduced over ranks.

    Args:
        scorer: Any :class:`vlp_core.method.Scorer`; its model (``.model``) is put in eval mode.
        images: Batches ``(images_uint8_BCHW, labels_B)``.
        classnames: Class names, index = label.
        templates: Prompt templates with a ``{}`` placeholder.
        tokenizer: ``list[str] -> LongTensor [B, L]``.
        device: Where states and scores are computed.
        batch_size: Largest image batch and prompt chunk.
        dtype: ``torch.bfloat16``/``float16`` run the towers under autocast.
        mean, std: Per-channel image statistics in [0, 1] units (``model.vision.image_mean``/``image_std``).
        per_class: Also report ``mean_per_class_recall`` (see module docstring).

    Returns:
        ``{"top1": %, "top5": % (only with >= 5 classes), ["mean_per_class_recall": %,] "n": images}``;
        NaN accuracies when ``n == 0``.
    """
    device = torch.device(device)
    ks = [1, 5] if len(classnames) >= 5 else [1]
    C = len(classnames)
    hits_K = torch.zeros(len(ks) + 1, dtype=torch.float64, device=device)  # last slot: image count
    # Per class: top-1 hits, then image counts (only filled with ``per_class``).
    class_hits_2C = torch.zeros(2, C if per_class else 0, dtype=torch.float64, device=device)
    with evaluating(scorer):
        class_states = compute_class_states(
            scorer, classnames, templates, tokenizer, device=device, batch_size=batch_size, dtype=dtype
        )
        for images_BCHW, labels_B in iter_image_batches(images, batch_size):
            with autocast_for(device, dtype):
                img_states = to_float(
                    scorer.image_states(prepare_images(images_BCHW, device, mean=mean, std=std))
                )
            scores_BC = scorer.score(img_states, class_states)
            labels_B = labels_B.to(device)
            hits_KB = topk_hits(scores_BC, labels_B, ks)
            hits_K[:-1] += hits_KB.sum(dim=1)
            hits_K[-1] += labels_B.shape[0]
            if per_class:
                class_hits_2C[0].index_add_(0, labels_B, hits_KB[0])
                class_hits_2C[1].index_add_(0, labels_B, torch.ones_like(hits_KB[0]))
    # One reduction for both (the same collective on every rank, whatever its share held).
    reduced = all_reduce_sum(torch.cat([hits_K, class_hits_2C.flatten()]))
    hits_K, class_hits_2C = reduced[: hits_K.shape[0]], reduced[hits_K.shape[0] :].view(2, -1)
    n = int(hits_K[-1].item())
    out: dict[str, float] = {}
    for k, hits in zip(ks, hits_K[:-1].tolist()):
        out[f"top{k}"] = 100.0 * hits / n if n else float("nan")
    if per_class:
        present_C = class_hits_2C[1] > 0
        recall_C = class_hits_2C[0][present_C] / class_hits_2C[1][present_C]
        out["mean_per_class_recall"] = 100.0 * float(recall_C.mean()) if n else float("nan")
    out["n"] = float(n)
    return out
