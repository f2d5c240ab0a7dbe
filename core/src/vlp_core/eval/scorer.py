"""Scorer for factorised models plus the small helpers every evaluator shares.

Shape legend:
    B: batch of images or texts      C: classes          T: prompt templates per class
    L: token length                  D: embedding width  N: items (rows) of a state tensor
    H, W: image height and width

The distributed helpers use ``torch.distributed`` directly (guarded by ``is_available() and
is_initialized()``) so evaluation runs unchanged in a single process without any process group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlp_core.distributed import all_reduce_sum, get_rank, get_world_size
from vlp_core.method import Scorer

__all__ = [
    "EmbeddingScorer",
    "ScoreFn",
    "dist_rank_world",
    "all_gather_rows",
    "all_reduce_sum",
    "evaluating",
    "autocast_for",
    "to_float",
    "share_bounds",
]

# ``score_fn(query_states, candidate_states) -> [Bq, Bc]``; higher is more similar.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class EmbeddingScorer:
    """:class:`vlp_core.method.Scorer` for models whose score is a dot product of L2-normalised embeddings.

    Args:
        model: Module with ``encode_image(images_BCHW) -> [B, D]`` and ``encode_text(tokens_BL) -> [B, D]``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def image_states(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` (float32 even under autocast)."""
        # Normalise in float32: under bf16 autocast the norm of a 512-d vector loses ~3 digits otherwise.
        return F.normalize(self.model.encode_image(images_BCHW).float(), dim=-1)

    def text_states(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings ``[B, D]``."""
        return F.normalize(self.model.encode_text(tokens_BL).float(), dim=-1)

    def class_states(self, tokens_CTL: torch.Tensor) -> torch.Tensor:
        """Mean of the normalised template embeddings per class, renormalised: ``[C, D]``."""
        C, T, L = tokens_CTL.shape
        text_BD = self.text_states(tokens_CTL.reshape(C * T, L))
        return F.normalize(text_BD.view(C, T, -1).mean(dim=1), dim=-1)

    def score(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """Cosine similarities ``[Bi, Bt]``."""
        dtype = torch.promote_types(image_states.dtype, text_states.dtype)
        return image_states.to(dtype) @ text_states.to(dtype).T


# ---------------------------------------------------------------------------------------------------------
# Evaluation context


def _modules_of(scorer: Scorer) -> list[nn.Module]:
    if isinstance(scorer, nn.Module):
        return [scorer]
    model = getattr(scorer, "model", None)
    return [model] if isinstance(model, nn.Module) else []


@contextlib.contextmanager
def evaluating(scorer: Scorer) -> Iterator[None]:
    """Eval mode and ``no_grad`` for the scorer's model; every submodule's own mode is restored after.

    Restoring per submodule (not ``model.train()``) keeps deliberately frozen towers in eval mode.
    ``no_grad`` rather than ``inference_mode``: inference tensors written into a model's buffers (e.g. by
    a custom scorer) would break the next training step's autograd.
    """
    modes = [(m, m.training) for root in _modules_of(scorer) for m in root.modules()]
    for root in _modules_of(scorer):
        root.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def autocast_for(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` for half precisions; a no-op context for float32/float64."""
    device = torch.device(device)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def to_float(states: torch.Tensor) -> torch.Tensor:
    """Half-precision states -> float32 so that scores and comparisons are not done in 8-bit mantissas."""
    if states.dtype in (torch.float16, torch.bfloat16):
        return states.float()
    return states


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    return get_rank(), get_world_size()


def _dtype_from_str(name: str) -> torch.dtype:
    dtype = getattr(torch, name.rsplit(".", 1)[-1])
    assert isinstance(dtype, torch.dtype)
    return dtype


def all_gather_rows(x_N: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    """Concatenate every rank's rows in rank order; ranks may hold different counts, or none (``None``).

    Rows are padded to the largest count so ``all_gather`` sees equal sizes, then trimmed. Memory is
    linear in the total row count. Returns ``None`` only when no rank has a tensor.
    """
    rank, world = dist_rank_world()
    if world == 1:
        return x_N
    meta = None if x_N is None else (int(x_N.shape[0]), tuple(x_N.shape[1:]), str(x_N.dtype))
    metas: list = [None] * world
    # Trailing shape and dtype travel with the counts: a rank that saw no items cannot know them.
    dist.all_gather_object(metas, meta)
    known = [m for m in metas if m is not None]
    if not known:
        return None
    _, trailing, dtype_name = known[0]
    dtype = _dtype_from_str(dtype_name)
    counts = [0 if m is None else m[0] for m in metas]
    max_n = max(counts)
    device = x_N.device if x_N is not None else torch.device(device)
    padded = torch.zeros((max_n, *trailing), dtype=dtype, device=device)
    if x_N is not None and x_N.shape[0]:
        padded[: x_N.shape[0]] = x_N
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)


def share_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of ``n`` items for ``rank``; concatenating in rank order gives 0..n-1."""
    per = -(-n // world) if world else n
    start = min(n, rank * per)
    return start, min(n, start + per)
