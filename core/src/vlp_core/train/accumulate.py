"""Exact gradient accumulation for losses that couple the samples of a batch (contrastive losses).

With ``train.accum_steps = k`` a rank's batch is split into k chunks. Cutting the loss per chunk (the naive
way) shrinks every sample's negatives to the chunk; here one step gives the gradient of the loss on the whole
rank batch, as OpenCLIP's ``accum_freq`` feature cache does:

1. a pass without gradient computes every chunk's features (the RNG state before each chunk is saved);
2. for each chunk ``i``: restore its RNG state (dropout, drop-path and SimCSE's two dropout views repeat
   exactly, as activation checkpointing replays them), recompute its features with gradient, and evaluate the
   loss on the features of the whole batch: chunk ``i``'s fresh ones and the cached ones of the others. Its
   backward carries chunk ``i``'s share of the gradient; the k backwards add up to the whole-batch gradient;
3. the loss module's own parameters (temperature, bias) receive the whole gradient in every one of the k
   backwards, so theirs is divided by k.

Contract of a method's features (``model(batch) -> dict``) for merging: tensors with a batch dimension first
are concatenated; 0-dim tensors are per-batch sums (e.g. a generation loss summed over tokens, or a token
count) and are added. A method opts in with ``MethodSpec.exact_accumulation``; the others keep a loss per
chunk (divided by k), which their README says.

Shape legend: B rank batch, k chunks, b = B / k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from vlp_core.train.checkpoint import rng_state, set_rng_state

__all__ = ["split_batch", "merge_features", "merge_batches", "accumulate_exact"]


def split_batch(batch: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    """``chunks`` equal slices of every tensor and list along its first dimension; other values are shared."""
    sizes = {len(v) for v in batch.values() if isinstance(v, (Tensor, list)) and not (isinstance(v, Tensor)
                                                                                       and v.ndim == 0)}
    if len(sizes) != 1:
        raise ValueError(f"cannot split a batch whose fields have different lengths {sorted(sizes)}")
    (size,) = sizes
    if size % chunks:
        raise ValueError(f"a rank batch of {size} samples does not split into {chunks} accumulation chunks")
    per = size // chunks

    def part(v: Any, i: int) -> Any:
        if isinstance(v, list) or (isinstance(v, Tensor) and v.ndim > 0):
            return v[i * per:(i + 1) * per]
        return v

    return [{k: part(v, i) for k, v in batch.items()} for i in range(chunks)]


def _merge(values: Sequence[Any], key: str) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        if first.ndim == 0:
            return torch.stack(list(values)).sum()
        return torch.cat(list(values), dim=0)
    if isinstance(first, list):
        return [x for v in values for x in v]
    if isinstance(first, dict):
        return {k: _merge([v[k] for v in values], f"{key}.{k}") for k in first}
    if all(v == first for v in values[1:]):
        return first
    raise ValueError(f"cannot merge the accumulation chunks' '{key}': {type(first).__name__} values differ")


def merge_features(features: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One batch's features from its chunks' (see the module docstring for the contract)."""
    return {k: _merge([f[k] for f in features], k) for k in features[0]}


merge_batches = merge_features  # a batch dict follows the same rules (tensors and lists concatenated)


def accumulate_exact(
    step_module: nn.Module, model_for_train: nn.Module, chunks: list[dict[str, Any]], batch: dict[str, Any],
    *, backward: Callable[[Tensor], None], sync: Callable[[bool], Any], autocast: Any, device: torch.device,
) -> Any:
    """Accumulate the whole-batch gradient over ``chunks`` (see the module docstring).

    Args:
        step_module: The unwrapped ``TrainStep`` (its loss module's gradients are rescaled).
        model_for_train: The wrapped module (DDP, compiled, or the FSDP2-sharded ``step_module``), called as
            ``model_for_train(chunk, features_only=True)`` for the cache (through the wrapper, so FSDP2
            gathers the root's parameters) and ``model_for_train(chunk, cached=..., index=i, full_batch=batch)``.
        chunks: The rank batch split into k chunks (already on the device).
        batch: The whole rank batch (what the loss sees besides the features).
        backward: Runs the backward of a loss (with the grad scaler where there is one).
        sync: ``sync(last) -> context manager`` that defers the gradient all-reduce/reduce-scatter until the
            last chunk.
        autocast: The precision context.
        device: The device.

    Returns:
        The last chunk's ``LossOutput``: the whole batch's loss and parts.
    """
    states, cached = [], []
    with torch.no_grad(), autocast:
        for chunk in chunks:
            states.append(rng_state())  # CPU and (current device) CUDA generators
            cached.append(model_for_train(chunk, features_only=True))
    after = rng_state()
    out = None
    for i, chunk in enumerate(chunks):
        set_rng_state(states[i])
        with sync(i == len(chunks) - 1), autocast:
            out = model_for_train(chunk, cached=cached, index=i, full_batch=batch)
        backward(out.loss)
    set_rng_state(after)
    for p in step_module.loss.parameters():  # the whole gradient arrived once per chunk
        if p.grad is not None:
            p.grad.div_(len(chunks))
    return out
