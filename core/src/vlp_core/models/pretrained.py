"""Loading weights into a module from a local file, a local folder or a Hugging Face hub repository.

Accepted sources:
    - ``*.safetensors`` file;
    - ``*.pt`` / ``*.pth`` / ``*.bin`` / ``*.ckpt`` file read with ``torch.load(weights_only=True)``; a dict
      that wraps the weights under ``"state_dict"`` or ``"model"`` (trainer checkpoints) is unwrapped;
    - a folder holding one of :data:`WEIGHT_FILES`;
    - a hub repository id ``owner/name`` (optionally ``hf-hub:owner/name``), downloaded with
      ``huggingface_hub.hf_hub_download``.

Key clean-up: a leading ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (``torch.compile``) are
removed from every key, then ``prefix`` selects a sub-tree (``"visual."`` keeps the keys under it and strips
the prefix).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WEIGHT_FILES", "load_pretrained", "read_state_dict", "select_prefix", "apply_state_dict"]

# Looked for, in this order, inside a folder or a hub repository.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHOW = 5  # keys listed in an error message


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if path.suffix in _TORCH_SUFFIXES:
        obj: Any = torch.load(str(path), map_location="cpu", weights_only=True)
        # Trainer checkpoints wrap the weights; unwrap one level (``{"state_dict": ...}``/``{"model": ...}``).
        if isinstance(obj, Mapping):
            for key in _WRAPPER_KEYS:
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
        if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
        return dict(obj)
    raise ValueError(
        f"unsupported weight file {path}: expected .safetensors or one of {', '.join(_TORCH_SUFFIXES)}"
    )


def _looks_local(source: str) -> bool:
    """Whether ``source`` is meant as a local path (so a miss is an error, not a hub look-up)."""
    return (
        source.startswith(("/", ".", "~"))
        or source.endswith((".safetensors", *_TORCH_SUFFIXES))
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


def _strip(key: str) -> str:
    changed = True
    while changed:  # DDP around a compiled module gives ``module._orig_mod.``; strip in any order
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


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
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            raise ValueError(f"pretrained folder {source} holds none of {', '.join(WEIGHT_FILES)}")
        path = found[0]
    elif not path.is_file():
        if _looks_local(source):
            raise ValueError(f"pretrained weights not found: {source}")
        path = _download_from_hub(source.removeprefix("hf-hub:"))
    return {_strip(k): v for k, v in _read_file(path).items()}


def select_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the keys under ``prefix`` and strip it; an empty prefix keeps everything."""
    if not prefix:
        return dict(state_dict)
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


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
    own = module.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"shape mismatch loading {source}: {_listing(mismatched)}")
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if problems:
            raise ValueError(f"cannot load {source}: " + "; ".join(problems))
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
        sample = _listing(sorted(state_dict))
        raise ValueError(f"no key of {source} starts with prefix {prefix!r}; keys look like: {sample}")
    apply_state_dict(module, selected, strict=strict, source=source)
