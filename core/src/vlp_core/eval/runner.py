"""Run every evaluation set named in an :class:`EvalConfig` and collect flat ``"<set>/<metric>"`` results.

Shape legend:
    (no tensors are handled here beyond scalar counts)

Sets live in ``<root>/eval/<name>/`` (the layout ``vlp-data synth`` writes). A retrieval set's optional
``set.json`` ``{"match": "text"}`` counts its hits by caption text (``match`` of
:func:`vlp_core.eval.retrieval_eval`; the shapes world's ``retrieval_multi``), ``"image"`` (the default)
by each caption's own image. ``cfg.data``, when set, replaces ``root``; it may name either the world root
or its ``eval`` folder itself. Besides those: ``cfg.imagefolder`` (an ImageFolder root; ImageNet when its
class folders are WordNet ids, named ``imagenet``, else after the folder) and ``cfg.wds`` (CLIP_benchmark
webdataset sets, see :mod:`vlp_core.eval.clip_benchmark`; named after their folders, ``wds_`` dropped, or
``name=folder``).

Images are resized to ``image_size`` with ``interpolation`` and normalised with ``mean``/``std``: pass the
model's ``model.vision`` values (:func:`preprocess_kwargs` builds them from a ``VisionConfig``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from vlp_core.config import EvalConfig
from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD, interpolation_mode, normalize_stats
from vlp_core.eval.clip_benchmark import (
    WdsEvalSet,
    load_wds_classification,
    load_wds_retrieval,
    open_wds_set,
    parse_wds_specs,
)
from vlp_core.eval.compositional import compositional_eval
from vlp_core.eval.datasets import (
    ImageBatches,
    imagefolder_set_name,
    load_compositional_shards,
    load_imagefolder,
    load_retrieval_shards,
    load_zeroshot_shards,
)
from vlp_core.eval.retrieval import retrieval_eval
from vlp_core.eval.scorer import all_reduce_sum, dist_rank_world
from vlp_core.eval.zeroshot import zeroshot_eval
from vlp_core.method import Scorer

__all__ = ["run_evaluation", "eval_dir_for", "split_names", "preprocess_kwargs"]

T = TypeVar("T")


def split_names(names: str) -> list[str]:
    """Comma-separated set names, blanks dropped (``""`` disables a kind of evaluation)."""
    return [n.strip() for n in names.split(",") if n.strip()]


def eval_dir_for(cfg: EvalConfig, root: str | Path) -> Path:
    """The folder holding the eval sets: ``<cfg.data or root>/eval``, or that folder itself if it has none."""
    base = Path(cfg.data) if cfg.data else Path(root)
    return base / "eval" if (base / "eval").is_dir() else base


def preprocess_kwargs(vision: Any) -> dict[str, Any]:
    """``image_size``, ``interpolation``, ``mean`` and ``std`` for :func:`run_evaluation` from a
    ``VisionConfig`` (``cfg.model.vision``)."""
    return {"image_size": vision.image_size, "interpolation": vision.interpolation, "mean": vision.image_mean,
            "std": vision.image_std}


def _wds_sets(spec: Any) -> list[WdsEvalSet]:
    sets = [open_wds_set(folder, name=name) for name, folder in parse_wds_specs(spec or "")]
    names = [s.name for s in sets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"eval.wds: several sets are named {dup}; name them explicitly (name=folder)")
    return sets


def _set_folder(eval_dir: Path, name: str, kind: str) -> Path:
    folder = eval_dir / name
    if not folder.is_dir():
        raise ValueError(f"{kind} eval set '{name}' not found: {folder}")
    return folder


def _retrieval_match(folder: Path) -> Literal["image", "text"]:
    """``match`` of a retrieval set's optional ``set.json``: "image" (also when absent) or "text"."""
    path = folder / "set.json"
    if not path.is_file():
        return "image"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    match = meta.get("match", "image") if isinstance(meta, dict) else None
    if match not in ("image", "text"):
        raise ValueError(f"{path}: 'match' must be 'image' or 'text', got {match!r}")
    return "text" if match == "text" else "image"


def _progress(batches: Iterable[T], desc: str, enabled: bool) -> Iterable[T]:
    if not enabled:
        return batches
    from tqdm import tqdm

    return tqdm(batches, desc=desc, leave=False, unit="batch")


def _skipped(batches: ImageBatches, device: torch.device) -> float:
    """Skipped samples summed over ranks (each rank counts its own share)."""
    return float(all_reduce_sum(torch.tensor([batches.skipped], dtype=torch.float64, device=device)).item())


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(
        f"{k}={v:.2f}" if k not in ("n", "n_images", "n_texts", "skipped") else f"{k}={v:.0f}"
        for k, v in metrics.items()
    )


def run_evaluation(
    scorer: Scorer,
    tokenizer: Callable[[list[str]], torch.Tensor],
    cfg: EvalConfig,
    *,
    root: str | Path,
    image_size: int,
    device: torch.device | str,
    log: Callable[[str], Any] = print,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    interpolation: str = "bilinear",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> dict[str, float]:
    """Zero-shot, retrieval, compositional, ImageFolder and CLIP_benchmark evaluation as configured.

    Args:
        scorer: The model's :class:`vlp_core.method.Scorer`.
        tokenizer: ``list[str] -> LongTensor [B, L]``.
        cfg: Which sets to run (comma-separated names) and the batch size.
        root: World root whose ``eval/`` folder holds the sets (overridden by ``cfg.data``).
        image_size: Side of the evaluation images.
        device: Where the model runs.
        log: Called with one line per set, on rank 0 only.
        progress: Show per-set progress bars on rank 0.
        dtype: ``torch.bfloat16``/``float16`` run the towers under autocast.
        interpolation: Resize mode, ``model.vision.interpolation`` ("bilinear" or "bicubic").
        mean, std: Per-channel statistics in [0, 1] units, ``model.vision.image_mean``/``image_std``.

    Returns:
        Flat metrics such as ``"zeroshot_color_shape/top1"``, ``"retrieval/i2t_R@1"``,
        ``"compositional/accuracy"``, ``"imagenet/top1"`` and ``"<set>/skipped"`` (undecodable or
        malformed samples), identical on every rank. CLIP_benchmark classification sets add
        ``"<set>/mean_per_class_recall"``.

    Raises:
        ValueError: A named set's folder (or the ImageFolder root, or a CLIP_benchmark set) does not exist
            or is malformed, or the preprocessing values are invalid.
    """
    device = torch.device(device)
    interpolation_mode(interpolation)  # fail on a bad value before any set is read
    mean, std = normalize_stats(mean, std)
    rank, world = dist_rank_world()
    show = progress and rank == 0
    eval_dir = eval_dir_for(cfg, root)
    bs = cfg.batch_size
    common: dict[str, Any] = {"image_size": image_size, "rank": rank, "world_size": world, "batch_size": bs,
                              "interpolation": interpolation}
    run_kw: dict[str, Any] = {"device": device, "batch_size": bs, "dtype": dtype, "mean": mean, "std": std}
    # Resolve every folder first: a typo in the last name should fail before minutes of evaluation.
    zeroshot = [(n, _set_folder(eval_dir, n, "zero-shot")) for n in split_names(cfg.zeroshot)]
    retrieval = [(n, _set_folder(eval_dir, n, "retrieval")) for n in split_names(cfg.retrieval)]
    retrieval_match = {n: _retrieval_match(folder) for n, folder in retrieval}
    compositional = [(n, _set_folder(eval_dir, n, "compositional")) for n in split_names(cfg.compositional)]
    if cfg.imagefolder and not Path(cfg.imagefolder).is_dir():
        raise ValueError(f"eval.imagefolder root not found: {cfg.imagefolder}")
    imagefolder_name = imagefolder_set_name(cfg.imagefolder) if cfg.imagefolder else ""
    # ``wds`` is EvalConfig's field for CLIP_benchmark sets (getattr: configs saved before it existed).
    wds_sets = _wds_sets(cfg.wds)
    taken = {n for n, _ in zeroshot + retrieval + compositional}
    for extra in [imagefolder_name] * bool(imagefolder_name) + [ws.name for ws in wds_sets]:
        if extra in taken:
            raise ValueError(f"eval set name '{extra}' is used twice; name a CLIP_benchmark set with name=folder")
        taken.add(extra)

    results: dict[str, float] = {}

    def record(name: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            results[f"{name}/{key}"] = value
        if rank == 0:
            log(f"eval {name}: {_fmt(metrics)}")

    for name, folder in zeroshot:
        batches, classnames, templates = load_zeroshot_shards(folder, **common)
        metrics = zeroshot_eval(
            scorer, _progress(batches, name, show), classnames, templates, tokenizer, **run_kw
        )
        record(name, {**metrics, "skipped": _skipped(batches, device)})

    if cfg.imagefolder:
        batches, classnames, templates = load_imagefolder(cfg.imagefolder, **common)
        metrics = zeroshot_eval(
            scorer, _progress(batches, imagefolder_name, show), classnames, templates, tokenizer, **run_kw
        )
        record(imagefolder_name, {**metrics, "skipped": _skipped(batches, device)})

    for ws in wds_sets:
        if ws.kind == "classification":
            batches = load_wds_classification(ws, **common)
            metrics = zeroshot_eval(
                scorer, _progress(batches, ws.name, show), ws.classnames, ws.templates, tokenizer,
                per_class=True, **run_kw,
            )
        else:
            batches, captions, caption_to_image = load_wds_retrieval(ws, **common)
            metrics = retrieval_eval(
                scorer, _progress(batches, ws.name, show), captions, caption_to_image, tokenizer, **run_kw
            )
        record(ws.name, {**metrics, "skipped": _skipped(batches, device)})

    for name, folder in retrieval:
        batches, captions, caption_to_image = load_retrieval_shards(folder, **common)
        metrics = retrieval_eval(
            scorer, _progress(batches, name, show), captions, caption_to_image, tokenizer,
            match=retrieval_match[name], **run_kw,
        )
        record(name, {**metrics, "skipped": _skipped(batches, device)})

    for name, folder in compositional:
        batches = load_compositional_shards(folder, **common)
        metrics = compositional_eval(scorer, _progress(batches, name, show), tokenizer, **run_kw)
        record(name, {**metrics, "skipped": _skipped(batches, device)})
    return results
