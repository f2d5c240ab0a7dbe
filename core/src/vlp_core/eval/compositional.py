"""Compositional probe: does the image score its true caption above a minimally changed negative?

Shape legend:
    B: batch of images    H, W: image height and width

Accuracy is the fraction of images with ``score(image, positive) > score(image, negative)``, strictly: a
tie is a miss, so a model that cannot tell the two captions apart scores 0 %, not 50 %.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD, prepare_images
from vlp_core.eval.datasets import iter_image_batches
from vlp_core.eval.scorer import all_reduce_sum, autocast_for, evaluating, to_float
from vlp_core.method import Scorer

__all__ = ["compositional_eval", "pair_scores"]

Tokenizer = Callable[[list[str]], torch.Tensor]


def pair_scores(
    scorer: Scorer,
    image_states: torch.Tensor,
    positives: list[str],
    negatives: list[str],
    tokenizer: Tokenizer,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive_B, negative_B)`` scores of each image with its own two captions.

    Both captions go through one ``text_states`` and one ``score`` call so that an identical positive and
    negative give bit-identical scores (a tie), whatever the kernels do with different batch shapes.
    """
    B = image_states.shape[0]
    tokens_BL = tokenizer(list(positives) + list(negatives)).to(device)
    with autocast_for(device, dtype):
        text_states = to_float(scorer.text_states(tokens_BL))
    # [B, 2B]; only the 2B pairs on the two diagonals are used, bounded by the batch size.
    scores_BB2 = scorer.score(image_states, text_states)
    idx_B = torch.arange(B, device=scores_BB2.device)
    return scores_BB2[idx_B, idx_B], scores_BB2[idx_B, idx_B + B]


def compositional_eval(
    scorer: Scorer,
    samples: Iterable[tuple[torch.Tensor, list[str], list[str]]],
    tokenizer: Tokenizer,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> dict[str, float]:
    """Compositional accuracy on this rank's share of ``samples``, reduced over ranks.

    Args:
        scorer: Any :class:`vlp_core.method.Scorer`.
        samples: Batches ``(images_uint8_BCHW, positives, negatives)``.
        tokenizer: ``list[str] -> LongTensor [B, L]``.
        device: Where states and scores are computed.
        batch_size: Largest image batch.
        dtype: ``torch.bfloat16``/``float16`` run the towers under autocast.
        mean, std: Per-channel image statistics in [0, 1] units (``model.vision.image_mean``/``image_std``).

    Returns:
        ``{"accuracy": %, "n": images}``; NaN accuracy when ``n == 0``.
    """
    device = torch.device(device)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # correct, count
    with evaluating(scorer):
        for images_BCHW, positives, negatives in iter_image_batches(samples, batch_size):
            with autocast_for(device, dtype):
                images = prepare_images(images_BCHW, device, mean=mean, std=std)
                img_states = to_float(scorer.image_states(images))
            pos_B, neg_B = pair_scores(
                scorer, img_states, positives, negatives, tokenizer, device=device, dtype=dtype
            )
            totals[0] += (pos_B > neg_B).sum()
            totals[1] += pos_B.shape[0]
    all_reduce_sum(totals)
    n = int(totals[1].item())
    return {"accuracy": 100.0 * float(totals[0]) / n if n else float("nan"), "n": float(n)}
