"""CLIP_benchmark's webdataset evaluation sets, read as they are on disk.

Shape legend:
    B: batch of images    M: captions    H, W: image height and width

Layout (what ``clip_benchmark.webdataset_builder.convert_dataset`` writes, and the ``clip-benchmark/wds_*``
repositories on the Hugging Face hub hold)::

    <root>/classnames.txt                          one class name per line, line i = class index i
    <root>/zeroshot_classification_templates.txt   one template per line, ``{c}`` marks the class name
    <root>/dataset_type.txt                        optional: "retrieval"; absent = "classification"
    <root>/test/nshards.txt                        the shard count n (optional here: else every *.tar)
    <root>/test/0.tar ... <n-1>.tar                members <key>.cls (class index as text) and
                                                   <key>.webp|png|jpg|jpeg; retrieval sets <key>.txt
                                                   (the image's captions, one per line)

Classification sets run zero-shot with their own class names and templates; retrieval sets run image<->text
recall. Shards are read in numeric order (``0, 1, ..., 10``, as CLIP_benchmark's brace pattern does), and
sharding over ranks is the readers' usual one (see :mod:`vlp_core.eval.datasets`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from vlp_core.eval.datasets import (
    DEFAULT_TEMPLATES,
    ImageBatches,
    labelled_shard_batches,
    normalize_templates,
    retrieval_batches,
)
from vlp_core.eval.imagenet import imagenet_classnames, imagenet_templates

__all__ = ["WdsEvalSet", "parse_wds_specs", "open_wds_set", "load_wds_classification", "load_wds_retrieval"]

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"


@dataclass(frozen=True)
class WdsEvalSet:
    """One CLIP_benchmark webdataset set, metadata resolved (no sample read yet).

    Attributes:
        name: Result prefix (``<name>/top1``...).
        root: The set's folder.
        kind: ``"classification"`` or ``"retrieval"``.
        urls: Shards of the split, in numeric order.
        classnames: Class names (empty for retrieval).
        templates: Prompt templates with ``{}`` (empty for retrieval).
    """

    name: str
    root: Path
    kind: Literal["classification", "retrieval"]
    urls: list[str]
    classnames: list[str]
    templates: list[str]


def parse_wds_specs(spec: str | Iterable[str]) -> list[tuple[str | None, Path]]:
    """``eval.wds`` entries -> ``(name or None, folder)``: comma-separated (or a list of) ``folder`` or
    ``name=folder``; blanks dropped."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[tuple[str | None, Path]] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if sep and name.strip() and "/" not in name:
            out.append((name.strip(), Path(path.strip())))
        else:
            out.append((None, Path(item)))
    return out


def default_set_name(root: Path) -> str:
    """``wds_imagenet1k`` -> ``imagenet1k``; a Hugging Face cache snapshot
    (``datasets--clip-benchmark--wds_cars/snapshots/<hash>``) is named after its repository."""
    name = root.name
    if root.parent.name == "snapshots" and "--" in root.parent.parent.name:
        name = root.parent.parent.name.rsplit("--", 1)[-1]
    return name[4:] if name.startswith("wds_") and len(name) > 4 else name


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return [line.strip() for line in text.splitlines()]


def _natural_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def _split_urls(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"CLIP_benchmark set {root} has no '{split}' split folder: {folder}")
    nshards_path = folder / "nshards.txt"
    if nshards_path.is_file():
        lines = [x for x in _read_lines(nshards_path) if x]
        if len(lines) != 1 or not lines[0].isdigit() or int(lines[0]) <= 0:
            raise ValueError(f"{nshards_path} must hold one positive shard count, got {lines!r}")
        paths = [folder / f"{i}.tar" for i in range(int(lines[0]))]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"{nshards_path} lists {len(paths)} shards but {folder} lacks {', '.join(missing[:5])}")
    else:
        paths = sorted(folder.glob("*.tar"), key=_natural_key)
        if not paths:
            raise ValueError(f"no *.tar shards in {folder}")
    return [str(p) for p in paths]


def _classnames(root: Path) -> list[str]:
    path = root / CLASSNAMES_FILE
    if not path.is_file():
        raise ValueError(f"CLIP_benchmark classification set {root} has no {CLASSNAMES_FILE}")
    names = _read_lines(path)
    while names and not names[-1]:
        names.pop()
    if not names:
        raise ValueError(f"{path} holds no class names")
    if "" in names:
        raise ValueError(f"{path} line {names.index('') + 1} is empty (line i names class i)")
    return names


def _templates(root: Path, classnames: list[str]) -> list[str]:
    path = root / TEMPLATES_FILE
    if path.is_file():
        return normalize_templates([t for t in _read_lines(path) if t], path)
    if classnames == imagenet_classnames():
        log.warning("%s: no %s; using OpenAI's ImageNet templates", root, TEMPLATES_FILE)
        return imagenet_templates()
    log.warning("%s: no %s; using the %d default templates", root, TEMPLATES_FILE, len(DEFAULT_TEMPLATES))
    return list(DEFAULT_TEMPLATES)


def open_wds_set(root: str | Path, *, name: str | None = None, split: str = "test") -> WdsEvalSet:
    """Resolve a CLIP_benchmark set's metadata and shards; raises ``ValueError`` naming what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"CLIP_benchmark set folder not found: {root}")
    kind = "classification"
    type_path = root / TYPE_FILE
    if type_path.is_file():
        kind = next((x.lower() for x in _read_lines(type_path) if x), "classification")
    if kind not in ("classification", "retrieval"):
        raise ValueError(f"{type_path}: dataset type {kind!r} is not supported (classification or retrieval)")
    urls = _split_urls(root, split)
    name = name or default_set_name(root)
    if kind == "retrieval":
        return WdsEvalSet(name=name, root=root, kind="retrieval", urls=urls, classnames=[], templates=[])
    classnames = _classnames(root)
    return WdsEvalSet(name=name, root=root, kind="classification", urls=urls, classnames=classnames,
                      templates=_templates(root, classnames))


def load_wds_classification(
    ws: WdsEvalSet,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
) -> ImageBatches:
    """Batches ``(images_uint8_BCHW, labels_B)`` of this rank's share of a classification set."""
    if ws.kind != "classification":
        raise ValueError(f"{ws.root} is a {ws.kind} set, not a classification set")
    return labelled_shard_batches(
        ws.urls, len(ws.classnames), ws.root / CLASSNAMES_FILE, image_size=image_size, rank=rank,
        world_size=world_size, batch_size=batch_size, interpolation=interpolation, name=str(ws.root),
    )


def _txt_captions(sample: dict[str, Any]) -> list[str] | None:
    """The ``txt`` member's non-empty lines; ``None`` (skip the sample) when absent or not UTF-8."""
    raw = sample.get("txt")
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_wds_retrieval(
    ws: WdsEvalSet,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
) -> tuple[ImageBatches, list[str], torch.Tensor]:
    """``(batches of (images_uint8_BCHW, image_ids_B), captions, caption_to_image [M])`` of a retrieval set;
    see :func:`vlp_core.eval.datasets.load_retrieval_shards`."""
    if ws.kind != "retrieval":
        raise ValueError(f"{ws.root} is a {ws.kind} set, not a retrieval set")
    return retrieval_batches(
        ws.urls, _txt_captions, image_size=image_size, rank=rank, world_size=world_size, batch_size=batch_size,
        interpolation=interpolation, name=str(ws.root),
    )
