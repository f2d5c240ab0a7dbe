"""ImageNet-1k metadata shipped with vlp-core (``vlp_core/assets/imagenet_*.txt``).

* ``imagenet_wnids.txt``: the 1000 WordNet ids in the standard class-index order (sorted; from timm's
  ``imagenet_synsets.txt``, Apache-2.0).
* ``imagenet_classnames.txt``: OpenAI's cleaned class names in the same order (from open_clip's
  ``IMAGENET_CLASSNAMES``, MIT). Two names repeat ("missile", "sunglasses"), as in OpenAI's list.
* ``imagenet_templates.txt``: OpenAI's 80 prompt templates, ``{c}`` marking the class name (CLIP_benchmark's
  convention); :func:`imagenet_templates` returns them with ``{}`` as every reader here does.

An ImageFolder whose class folders are all ImageNet wnids is classified zero-shot over all 1000 classes
(label = standard index), whatever subset of the classes it holds.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources

__all__ = ["imagenet_wnids", "imagenet_classnames", "imagenet_templates", "imagenet_index", "is_imagenet_wnid_set"]

_COUNTS = {"imagenet_wnids.txt": 1000, "imagenet_classnames.txt": 1000, "imagenet_templates.txt": 80}


@functools.cache
def _asset_lines(name: str) -> tuple[str, ...]:
    path = resources.files("vlp_core").joinpath("assets", name)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"vlp-core asset {name} is missing or unreadable ({e}); reinstall vlp-core") from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(lines) != _COUNTS[name]:
        raise ValueError(f"vlp-core asset {name} has {len(lines)} entries, expected {_COUNTS[name]}")
    return lines


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids (``n01440764``, ...) in class-index order."""
    return list(_asset_lines("imagenet_wnids.txt"))


def imagenet_classnames() -> list[str]:
    """OpenAI's 1000 cleaned ImageNet class names, index = standard class index."""
    return list(_asset_lines("imagenet_classnames.txt"))


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates with a ``{}`` placeholder."""
    return [t.replace("{c}", "{}") for t in _asset_lines("imagenet_templates.txt")]


@functools.lru_cache(maxsize=1)
def _wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(_asset_lines("imagenet_wnids.txt"))}


def is_imagenet_wnid_set(names: Iterable[str]) -> bool:
    """True when ``names`` is non-empty and every name is one of the 1000 ImageNet-1k wnids."""
    names = list(names)
    index = _wnid_index()
    return bool(names) and all(n in index for n in names)


def imagenet_index(wnid: str) -> int:
    """Standard class index of an ImageNet-1k wnid."""
    return _wnid_index()[wnid]
