"""Readers for the evaluation sets: zero-shot shards, ImageFolder roots, retrieval and compositional shards.

Shape legend:
    B: batch of images    H, W: image height and width (both ``image_size`` after the transform)

Every reader takes the image side and the resize ``interpolation`` (``model.vision.image_size`` and
``interpolation``) and is a plain re-iterable (no DataLoader: decoding a thousand small JPEGs is quick) yielding
``(images_uint8_BCHW, *fields)`` for this rank's share: the samples whose position in the whole set
(all samples of all shards, shards in sorted order) is ``rank`` modulo ``world_size``. Undecodable images
and samples with unreadable metadata are skipped and counted in :attr:`ImageBatches.skipped`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from vlp_core.data.tario import CorruptShard, iter_samples
from vlp_core.data.transforms import ImageDecodeError, build_transform, decode_image
from vlp_core.eval.imagenet import imagenet_classnames, imagenet_index, imagenet_templates, is_imagenet_wnid_set

__all__ = [
    "DEFAULT_TEMPLATES",
    "IMAGE_EXTS",
    "ImageBatches",
    "load_zeroshot_shards",
    "load_imagefolder",
    "imagefolder_set_name",
    "normalize_templates",
    "load_retrieval_shards",
    "load_compositional_shards",
    "iter_image_batches",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES: list[str] = [
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a rendering of a {}.",
]

# Member extensions (shards) and file suffixes (ImageFolder) accepted as the image.
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
_FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

# One raw item of a rank's share: ``(image bytes, per-sample fields)`` or ``None`` for a sample to skip.
RawItem = tuple[bytes, tuple[Any, ...]] | None


class ImageBatches:
    """Re-iterable batches ``(images_uint8_BCHW, *fields)``; a field of ints is collated to a LongTensor.

    Args:
        raw_items: Returns a fresh iterator over this rank's raw items on each call.
        image_size: Output side ``S`` of ``build_transform``.
        batch_size: Images per batch (the last one may be smaller).
        name: For log messages.
        interpolation: Resize mode of ``build_transform`` ("bilinear" or "bicubic").
    """

    def __init__(
        self,
        raw_items: Callable[[], Iterator[RawItem]],
        *,
        image_size: int,
        batch_size: int,
        name: str,
        interpolation: str = "bilinear",
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._raw_items = raw_items
        self._transform = build_transform(image_size, interpolation=interpolation)
        self.batch_size = batch_size
        self.name = name
        # Skipped samples of the most recent full pass (reset at the start of each pass).
        self.skipped = 0

    def _collate(self, images: list[torch.Tensor], fields: list[tuple[Any, ...]]) -> tuple[Any, ...]:
        columns: list[Any] = []
        for column in zip(*fields):
            if all(isinstance(v, int) for v in column):
                columns.append(torch.tensor(column, dtype=torch.long))
            else:
                columns.append(list(column))
        return (torch.stack(images), *columns)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        self.skipped = 0
        images: list[torch.Tensor] = []
        fields: list[tuple[Any, ...]] = []
        for item in self._raw_items():
            if item is None:
                self.skipped += 1
                continue
            data, extra = item
            try:
                img_CHW = self._transform(decode_image(data))
            except ImageDecodeError as e:
                log.debug("%s: skipping undecodable image: %s", self.name, e)
                self.skipped += 1
                continue
            images.append(img_CHW)
            fields.append(extra)
            if len(images) == self.batch_size:
                yield self._collate(images, fields)
                images, fields = [], []
        if images:
            yield self._collate(images, fields)


# ---------------------------------------------------------------------------------------------------------
# Shard helpers


def _shard_urls(folder: Path, what: str) -> list[str]:
    if not folder.is_dir():
        raise ValueError(f"{what} folder not found: {folder}")
    urls = sorted(str(p) for p in folder.glob("*.tar"))
    if not urls:
        raise ValueError(f"no *.tar shards in {what} folder {folder}")
    return urls


def _iter_all_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Every sample of every shard in order; a broken-off shard ends with a warning, not a traceback."""
    for url in urls:
        try:
            yield from iter_samples(url)
        except CorruptShard as e:
            log.warning("eval shard is truncated, later samples of it are lost: %s", e)


def _image_bytes(sample: dict[str, Any]) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    return None


def _own_samples(urls: list[str], rank: int, world_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(position, sample)`` for the samples of this rank's share."""
    _check_rank(rank, world_size)
    for pos, sample in enumerate(_iter_all_samples(urls)):
        if pos % world_size == rank:
            yield pos, sample


def _shard_batches(
    urls: list[str], parse: Callable[[dict[str, Any]], tuple[Any, ...] | None], *, image_size: int, rank: int,
    world_size: int, batch_size: int, interpolation: str, name: str,
) -> ImageBatches:
    """Batches ``(images_uint8_BCHW, *fields)`` of this rank's share of ``urls``: ``parse(sample)`` gives the
    fields of a sample with an image, or ``None`` to skip it (as is a sample without an image)."""

    def raw_items() -> Iterator[RawItem]:
        for _, sample in _own_samples(urls, rank, world_size):
            data = _image_bytes(sample)
            fields = None if data is None else parse(sample)
            if data is None or fields is None:
                yield None
                continue
            yield data, fields

    return ImageBatches(
        raw_items, image_size=image_size, batch_size=batch_size, name=name, interpolation=interpolation
    )


def _check_rank(rank: int, world_size: int) -> None:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def normalize_templates(templates: Iterable[Any], where: str | Path) -> list[str]:
    """Templates with a ``{}`` placeholder; CLIP_benchmark's ``{c}`` is accepted and rewritten to ``{}``.

    Raises:
        ValueError: A template is not a string, has no placeholder, or does not format (stray braces).
    """
    out = []
    for t in templates:
        if not isinstance(t, str) or ("{}" not in t and "{c}" not in t):
            raise ValueError(f"every template in {where} must be a string with a '{{}}' or '{{c}}' placeholder, "
                             f"got {t!r}")
        t = t.replace("{c}", "{}")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError):
            raise ValueError(f"template {t!r} in {where} does not format: escape literal braces as '{{{{'") from None
        out.append(t)
    if not out:
        raise ValueError(f"no templates in {where}")
    return out


def _templates_from(meta: dict[str, Any], path: Path) -> list[str]:
    return normalize_templates(meta.get("templates") or DEFAULT_TEMPLATES, path)


# ---------------------------------------------------------------------------------------------------------
# Zero-shot classification


def labelled_shard_batches(
    urls: list[str],
    num_classes: int,
    classes_file: str | Path,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
    name: str = "",
) -> ImageBatches:
    """Batches ``(images_uint8_BCHW, labels_B)`` of shards whose samples hold an image and a ``cls`` member
    (the class index as ASCII text); a label outside ``num_classes`` (listed in ``classes_file``) is an error."""

    def label_of(sample: dict[str, Any]) -> tuple[int] | None:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (KeyError, UnicodeDecodeError, ValueError):
            return None
        if not 0 <= label < num_classes:
            # A label beyond the class list means the shards and the class list do not belong together.
            raise ValueError(
                f"label {label} of sample {sample['__key__']} in {sample['__url__']} is outside the "
                f"{num_classes} classes of {classes_file}"
            )
        return (label,)

    return _shard_batches(
        urls, label_of, image_size=image_size, rank=rank, world_size=world_size, batch_size=batch_size,
        interpolation=interpolation, name=name,
    )


def load_zeroshot_shards(
    folder: str | Path,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
) -> tuple[ImageBatches, list[str], list[str]]:
    """Zero-shot shards (members ``jpg`` + ``cls``) and their ``classes.json``.

    Returns:
        ``(batches of (images_uint8_BCHW, labels_B), classnames, templates)``.
    """
    folder = Path(folder)
    urls = _shard_urls(folder, "zero-shot")
    meta_path = folder / "classes.json"
    if not meta_path.is_file():
        raise ValueError(f"zero-shot set {folder} has no classes.json: {meta_path}")
    meta = _read_json(meta_path)
    classnames = meta.get("classnames") if isinstance(meta, dict) else None
    if not classnames or not all(isinstance(c, str) for c in classnames):
        raise ValueError(f"{meta_path} needs a non-empty list of strings under 'classnames'")
    templates = _templates_from(meta, meta_path)
    batches = labelled_shard_batches(
        urls, len(classnames), meta_path, image_size=image_size, rank=rank, world_size=world_size,
        batch_size=batch_size, interpolation=interpolation, name=str(folder),
    )
    return batches, list(classnames), templates


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise ValueError(f"ImageFolder root not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"ImageFolder root {root} has no class subfolders")
    return class_dirs


_SPLIT_NAMES = {"val", "validation", "test", "train", "eval"}


def imagefolder_set_name(root: str | Path) -> str:
    """Result name of an ImageFolder: ``imagenet`` when its class folders are ImageNet-1k wnids, else the
    folder's name (prefixed by its parent's for a bare split name: ``imagenette/val`` -> ``imagenette_val``)."""
    root = Path(root).resolve()
    if is_imagenet_wnid_set(p.name for p in _class_dirs(root)):
        return "imagenet"
    name = root.name
    if name.lower() in _SPLIT_NAMES and root.parent.name:
        name = f"{root.parent.name}_{name}"
    return name


def load_imagefolder(
    root: str | Path,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
) -> tuple[ImageBatches, list[str], list[str]]:
    """An ImageFolder root: one subfolder per class (sorted; ``_`` in the name becomes a space).

    A root whose class folders are all ImageNet-1k WordNet ids (``n01440764``, ...; any subset of them) is
    ImageNet: the classes are all 1000 ImageNet classes with OpenAI's names, a folder's label its standard
    class index, and the templates OpenAI's 80. Templates come from ``classes.json`` at the root when present
    (key ``templates``), else OpenAI's (ImageNet) or :data:`DEFAULT_TEMPLATES`.

    Returns:
        ``(batches of (images_uint8_BCHW, labels_B), classnames, templates)``.
    """
    root = Path(root)
    class_dirs = _class_dirs(root)
    imagenet = is_imagenet_wnid_set(p.name for p in class_dirs)
    labels = [imagenet_index(p.name) for p in class_dirs] if imagenet else list(range(len(class_dirs)))
    files: list[tuple[Path, int]] = []
    for label, class_dir in zip(labels, class_dirs):
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()  # deterministic walk order, so every rank enumerates the same list
            for fname in sorted(filenames):
                if not fname.startswith(".") and Path(fname).suffix.lower() in _FOLDER_SUFFIXES:
                    files.append((Path(dirpath) / fname, label))
    if not files:
        raise ValueError(f"ImageFolder root {root} has no image files")
    if imagenet:
        classnames, templates = imagenet_classnames(), imagenet_templates()
    else:
        classnames, templates = [p.name.replace("_", " ") for p in class_dirs], list(DEFAULT_TEMPLATES)
    meta_path = root / "classes.json"
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if not isinstance(meta, dict):
            raise ValueError(f"{meta_path} must hold a JSON object (key 'templates')")
        templates = normalize_templates(meta.get("templates") or templates, meta_path)
    _check_rank(rank, world_size)

    def raw_items() -> Iterator[RawItem]:
        for path, label in files[rank::world_size]:
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("cannot read %s: %s", path, e)
                yield None
                continue
            yield data, (label,)

    batches = ImageBatches(
        raw_items, image_size=image_size, batch_size=batch_size, name=str(root), interpolation=interpolation
    )
    return batches, classnames, list(templates)


# ---------------------------------------------------------------------------------------------------------
# Retrieval


def _parse_captions(sample: dict[str, Any]) -> list[str] | None:
    try:
        meta = json.loads(sample["json"])
        captions = meta["captions"]
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        return None
    return captions


def retrieval_batches(
    urls: list[str],
    parse_captions: Callable[[dict[str, Any]], list[str] | None],
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
    name: str = "",
) -> tuple[ImageBatches, list[str], torch.Tensor]:
    """Image batches, captions and ``caption_to_image`` of retrieval shards; see :func:`load_retrieval_shards`.

    ``parse_captions(sample)`` returns the sample's captions, or ``None`` for a malformed sample (skipped).
    """
    _check_rank(rank, world_size)
    captions: list[str] = []
    owners: list[int] = []
    valid: list[bool] = []
    for pos, sample in enumerate(_iter_all_samples(urls)):
        caps = parse_captions(sample)
        ok = caps is not None and _image_bytes(sample) is not None
        valid.append(ok)
        if ok:
            assert caps is not None
            captions.extend(caps)
            owners.extend([pos] * len(caps))
    caption_to_image = torch.tensor(owners, dtype=torch.long)

    def raw_items() -> Iterator[RawItem]:
        for pos, sample in _own_samples(urls, rank, world_size):
            data = _image_bytes(sample)
            # ``valid`` comes from the first pass; a shard changed in between would be a broken set anyway.
            if pos >= len(valid) or not valid[pos] or data is None:
                yield None
                continue
            yield data, (pos,)

    batches = ImageBatches(
        raw_items, image_size=image_size, batch_size=batch_size, name=name, interpolation=interpolation
    )
    return batches, captions, caption_to_image


def load_retrieval_shards(
    folder: str | Path,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
) -> tuple[ImageBatches, list[str], torch.Tensor]:
    """Retrieval shards (members ``jpg`` + ``json`` ``{"captions": [...]}``).

    Every rank reads all captions (a first pass over the shards; the image side streams lazily in a
    second one) so caption ids are global and identical on all ranks. An image's id is its sample
    position in the whole set.

    Returns:
        ``(batches of (images_uint8_BCHW, image_ids_B), captions, caption_to_image)`` where
        ``caption_to_image[m]`` is the image id of caption ``m`` (LongTensor ``[M]``).
    """
    folder = Path(folder)
    urls = _shard_urls(folder, "retrieval")
    return retrieval_batches(
        urls, _parse_captions, image_size=image_size, rank=rank, world_size=world_size, batch_size=batch_size,
        interpolation=interpolation, name=str(folder),
    )


# ---------------------------------------------------------------------------------------------------------
# Compositional probe


def load_compositional_shards(
    folder: str | Path,
    *,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
    interpolation: str = "bilinear",
) -> ImageBatches:
    """Compositional probe shards (members ``jpg`` + ``json`` ``{"positive": str, "negative": str}``).

    Returns:
        Batches of ``(images_uint8_BCHW, positives: list[str], negatives: list[str])``.
    """
    folder = Path(folder)
    return _shard_batches(
        _shard_urls(folder, "compositional"), _positive_negative, image_size=image_size, rank=rank,
        world_size=world_size, batch_size=batch_size, interpolation=interpolation, name=str(folder),
    )


def _positive_negative(sample: dict[str, Any]) -> tuple[str, str] | None:
    """The sample's ``(positive, negative)`` captions, or ``None`` (skip it) when its json lacks either."""
    try:
        meta = json.loads(sample["json"])
        pos, neg = meta["positive"], meta["negative"]
    except (KeyError, TypeError, ValueError):
        return None
    return (pos, neg) if isinstance(pos, str) and isinstance(neg, str) else None


def iter_image_batches(batches: Iterable[tuple[Any, ...]], max_batch: int) -> Iterator[tuple[Any, ...]]:
    """Split incoming ``(images, *fields)`` batches larger than ``max_batch`` (fields sliced alike)."""
    for batch in batches:
        n = batch[0].shape[0]
        if n <= max_batch:
            yield batch
            continue
        for start in range(0, n, max_batch):
            yield tuple(b[start : start + max_batch] for b in batch)
