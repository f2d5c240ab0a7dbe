"""Pretrained vision towers for stage 2: whatever layout the file has, the trunk's weights without any head.

LLM2CLIP starts from a pretrained CLIP image tower and gives it a *new* projection (its ``load_checkpoint``
deletes every ``visual.head*`` key and every text key; the OpenAI loader pops ``visual.proj``). This module
does the same for the layouts a user is likely to hold, and loads the rest strictly (every trunk key, every
shape; a checkpoint of another architecture is a one-line error naming the keys):

- ``trunk.*``: a whole-tower file (``python -m vlp_llm2clip.export``, a vlp run's ``model.visual.*``);
- Hugging Face ``CLIPVisionModel``/``CLIPModel`` (``vision_model.*``), through :func:`convert_hf_clip_vision`;
- for an ``Eva`` trunk (``eva02_*_clip_*``): timm Eva state dicts, OpenCLIP's ``visual.trunk.*`` and
  EVA-CLIP's own layout (``visual.*`` with ``q_bias``/``v_bias``, ``mlp.w1/w2/w3``, ``ffn_ln``,
  ``inner_attn_ln``, ``rope.*`` buffers): the layout of the EVA02-CLIP releases and of LLM2CLIP's released
  ``LLM2CLIP-EVA02-*.pt`` towers, renamed by timm's EVA filter;
- for a ``VisionTransformer`` trunk: OpenAI CLIP (``visual.class_embedding`` ... ``visual.proj``; TorchScript
  archives too) and OpenCLIP with the OpenAI layout, renamed by timm's ``_convert_openai_clip``; timm ViT
  state dicts; OpenCLIP's ``visual.trunk.*``.

The activation (QuickGELU for OpenAI's weights) is not in a checkpoint's keys: the preset's tower decides it.
"""

from __future__ import annotations

import logging

from torch import Tensor

from vlp_core.models.pretrained import apply_state_dict, read_state_dict, select_prefix
from vlp_core.models.vit import VisionTower

__all__ = ["tower_state_dict", "load_vision_weights", "HEAD_PREFIXES"]

log = logging.getLogger("vlp")

# Classifier / CLIP projection heads, dropped: LLM2CLIP trains a fresh projection (``image_proj``).
HEAD_PREFIXES = ("head.", "head_drop.")
_HF_MARKERS = ("vision_model.embeddings.class_embedding", "embeddings.class_embedding")


def _is_eva(trunk: object) -> bool:
    from timm.models.eva import Eva

    return isinstance(trunk, Eva)


def tower_state_dict(state: dict[str, Tensor], trunk: object) -> tuple[dict[str, Tensor], list[str]]:
    """``state`` (any layout of the module docstring) -> ``(trunk keys, dropped head keys)``.

    Args:
        state: The checkpoint's tensors (wrapper prefixes already stripped).
        trunk: The timm ``Eva`` or ``VisionTransformer`` it will load into (timm's filters resample
            ``pos_embed``/the patch kernel to its grid when the checkpoint was trained at another size).
    """
    if any(k in state for k in _HF_MARKERS):
        from vlp_llm2clip.export import convert_hf_clip_vision

        state = convert_hf_clip_vision(state)
    if any(k.startswith("trunk.") for k in state):
        state = select_prefix(state, "trunk.")
    if _is_eva(trunk):
        from timm.models.eva import checkpoint_filter_fn as eva_filter

        out = eva_filter(state, trunk)
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        out = checkpoint_filter_fn(state, trunk)
    dropped = sorted(k for k in out if k.startswith(HEAD_PREFIXES))
    return {k: v for k, v in out.items() if not k.startswith(HEAD_PREFIXES)}, dropped


def load_vision_weights(tower: VisionTower, source: str) -> None:
    """Load the trunk weights of ``source`` (a file or folder, read by the core's safe loader) into ``tower``.

    Raises:
        ValueError: The file is missing or unsafe, or its trunk keys/shapes do not fit the tower (the message
            names the file and the first keys).
    """
    state = read_state_dict(source)
    trunk_state, dropped = tower_state_dict(state, tower.trunk)
    if not trunk_state:
        sample = ", ".join(sorted(state)[:5])
        raise ValueError(f"model.vision.pretrained {source}: no vision-tower keys found (keys look like: {sample})")
    if dropped:
        log.info("%s: dropped the checkpoint's projection head (%s); LLM2CLIP trains a new one", source,
                 ", ".join(dropped))
    apply_state_dict(tower.trunk, trunk_state, strict=True, source=f"model.vision.pretrained {source}")
