"""Loading weights into a module from a local file, a local folder or a Hugging Face hub repository.

Local files and folders are read by vlp's one safe loader, :func:`vlp_core.convert.safe_load.read_source`:
``*.safetensors``; ``*.pt`` / ``*.pth`` / ``*.bin`` / ``*.ckpt`` with ``torch.load(weights_only=True)`` only
(a pickle that could run code is refused); OpenAI's TorchScript archives; a folder holding one of
:data:`WEIGHT_FILES`. It unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and strips ``module.`` /
``_orig_mod.`` key prefixes. A hub repository id ``owner/name`` (optionally ``hf-hub:owner/name``) is
downloaded with ``huggingface_hub.hf_hub_download`` first.

``prefix`` then selects a sub-tree (``"visual."`` keeps the keys under it and strips the prefix).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from vlp_core.convert.registry import key_problems, listing, shape_mismatches
from vlp_core.convert.safe_load import TORCH_SUFFIXES, WEIGHT_FILES, read_source

__all__ = ["WEIGHT_FILES", "load_pretrained", "read_state_dict", "select_prefix", "apply_state_dict"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path (so a miss is an error, not a hub look-up)."""
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith((".safetensors", *TORCH_SUFFIXES))
        or not _HUB_ID.match(source.removeprefix("hf-hub:"))
    )


def _download_from_hub(repo_id: str) -> Path:  # pragma: no cover - needs network; never run in tests
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, name))
        except EntryNotFoundError:
            continue
    raise ValueError(f"hub repository {repo_id!r} has none of the weight files {', '.join(WEIGHT_FILES)}")


def read_state_dict(source: str) -> dict[str, Tensor]:
    """Read a state dict from ``source`` (see the module docstring) with wrapper prefixes stripped.

    Args:
        source: Local file, local folder, or hub repository id.

    Returns:
        Mapping from parameter/buffer name to CPU tensor.

    Raises:
        ValueError: If the source does not exist, has no weight file, or holds no state dict.
    """
    if not source:
        raise ValueError("empty pretrained source")
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_local(source):
            raise ValueError(f"pretrained weights not found: {source}")
        path = _download_from_hub(source.removeprefix("hf-hub:"))
    return read_source(path).state_dict


def select_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the keys under ``prefix`` and strip it; an empty prefix keeps everything."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def apply_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True, source: str = "state dict"
) -> None:
    """Copy ``state_dict`` into ``module`` after checking shapes and (if strict) key sets.

    Shape mismatches are always errors (even non-strict: silently skipping a resized tensor hides bugs).

    Args:
        module: Target module.
        state_dict: Weights, keyed like ``module.state_dict()``.
        strict: Also require that no key is missing or unexpected.
        source: Name used in error messages.

    Raises:
        ValueError: On shape mismatches, or on missing/unexpected keys when strict.
    """
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mismatched = shape_mismatches(state_dict, own, state_dict)
    if mismatched:
        raise ValueError(f"shape mismatch loading {source}: {listing(mismatched)}")
    if strict:
        problems = key_problems([k for k in own if k not in state_dict], [k for k in state_dict if k not in own])
        if problems:
            raise ValueError(f"cannot load {source}: {problems}")
    module.load_state_dict(dict(state_dict), strict=strict)


def load_pretrained(module: nn.Module, source: str, *, prefix: str = "", strict: bool = True) -> None:
    """Load weights from ``source`` into ``module``.

    Args:
        module: Target module.
        source: ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file, a folder with one of
            :data:`WEIGHT_FILES`, or a hub repository id.
        prefix: Sub-tree to load (``"visual."``); stripped from the keys.
        strict: Require exactly matching key sets (shapes must always match).

    Raises:
        ValueError: If the source is missing, the prefix selects nothing, or the weights do not fit.
    """
    state_dict = read_state_dict(source)
    selected = select_prefix(state_dict, prefix)
    if prefix and not selected:
        sample = listing(sorted(state_dict))
        raise ValueError(f"no key of {source} starts with prefix {prefix!r}; keys look like: {sample}")
    apply_state_dict(module, selected, strict=strict, source=source)
