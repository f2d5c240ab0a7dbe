"""The one extension point: a :class:`MethodSpec` tells the core how to build a method's parts.

The core never imports a method package and never branches on a method name; the CLIP/SigLIP baseline
(``vlp_core.clip``) plugs in through exactly this interface.

Contract of the parts:
- ``build_model(cfg, tokenizer) -> nn.Module`` whose ``forward(batch: dict) -> dict[str, Tensor]`` returns
  the features the loss needs. For evaluation it exposes ``encode_image(images_BCHW)`` and
  ``encode_text(tokens_BL)``; a method whose score does not factorise provides ``build_scorer``.
- ``build_loss(cfg) -> nn.Module`` whose ``forward(features: dict, batch: dict) -> LossOutput``. Learnable
  temperatures and method state (running averages as buffers) live here; both are checkpointed. Optional
  ``after_step(finite: Tensor)``: called once per optimizer step, after it, on every rank, with a 0-dim
  boolean tensor (False when the NaN guard skipped the step; read it on the device, without a host sync).
  State that forward computes from a batch is staged there and applied here, so exact accumulation (forward
  runs once per chunk on the whole batch's features) and skipped steps update it once, or not at all; select
  with ``torch.where(finite, staged, old)``, never blend (``0 * NaN`` is NaN: a NaN batch would leak in).
  Learnable temperatures are declared with :func:`vlp_core.losses.declare_bounds` and clamped here by
  :func:`vlp_core.losses.clamp_bounds_` (OpenCLIP's clamp of the stored scale to ``[0, ln 100]`` after each
  step; the forward's ``torch.clamp`` alone would leave a scale pushed past the cap with zero gradient for
  good). A loss with a learnable temperature therefore needs an ``after_step``.
- ``exact_accumulation``: the model's features merge across chunks (batch-first tensors concatenated,
  0-dim tensors summed) and the loss then gives the whole batch's gradient; see
  :mod:`vlp_core.train.accumulate`.
- ``build_adapter(cfg, tokenizer) -> SampleAdapter``: turns one raw webdataset sample (member bytes by
  extension) into tensors, or raises :class:`SkipSample`; ``collate`` stacks a list of them.
- ``build_scorer(model) -> Scorer`` (optional): used by zero-shot and retrieval evaluation.
- ``visualize(model, loss, batch) -> dict[str, ndarray]`` (optional): method-specific TensorBoard images
  (e.g. DreamLIP's grouping maps), tag -> HWC uint8 array. The trainer calls it on rank 0 only, every
  ``train.image_grid_every`` steps, under ``no_grad`` with the model in eval mode, on that step's batch
  (already on the device). It sees the unwrapped model, so it must not run collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from vlp_core.config import RunConfig

__all__ = ["MethodSpec", "LossOutput", "SampleAdapter", "Scorer", "SkipSample"]


class LossOutput(NamedTuple):
    loss: torch.Tensor
    # Scalars for logging: loss parts, temperatures, gate means. Tensors; read on the host only at log steps.
    parts: dict[str, torch.Tensor]


class SkipSample(Exception):
    """Raised by an adapter for a sample that must be skipped; ``reason`` is the counter it lands in."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@runtime_checkable
class SampleAdapter(Protocol):
    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]: ...

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]: ...


@runtime_checkable
class Scorer(Protocol):
    """Image-text scoring for evaluation. States may be any per-item tensors (first dim = items)."""

    def image_states(self, images_BCHW: torch.Tensor) -> torch.Tensor: ...

    def text_states(self, tokens_BL: torch.Tensor) -> torch.Tensor: ...

    def class_states(self, tokens_CTL: torch.Tensor) -> torch.Tensor:
        """Text states for C classes from T prompt templates each, tokens given as [C, T, L]."""
        ...

    def score(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        """[Bi, Bt] scores; higher is more similar."""
        ...


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type
    presets: Mapping[str, Callable[[], RunConfig]]
    build_model: Callable[[RunConfig, Any], nn.Module]
    build_loss: Callable[[RunConfig], nn.Module]
    build_adapter: Callable[[RunConfig, Any], SampleAdapter]
    build_scorer: Callable[[nn.Module], Scorer] | None = None
    visualize: Callable[[nn.Module, nn.Module, dict[str, Any]], Mapping[str, Any]] | None = None
    # The loss couples samples and supports exact accumulation: with train.accum_steps > 1 one step gives the
    # whole batch's gradient (vlp_core.train.accumulate). False: the loss is cut per chunk.
    exact_accumulation: bool = False
    default_preset: str = "demo"
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def preset(self, name: str) -> RunConfig:
        if name not in self.presets:
            import difflib

            close = difflib.get_close_matches(name, list(self.presets), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(
                f"unknown preset '{name}' for method '{self.name}'{hint} (known: {', '.join(self.presets)})"
            )
        cfg = self.presets[name]()
        cfg.method = self.name
        cfg.preset = name
        if cfg.loss is None:
            cfg.loss = self.config_cls()
        return cfg
