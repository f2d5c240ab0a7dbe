"""Run every evaluation set named in an :class:`EvalConfig` and collect flat ``"<set>/<metric>"`` results.

Shape legend:
    (no tensors are handled here beyond scalar counts)

Sets live in ``<root>/eval/<name>/`` (the layout ``vlp-data synth`` writes). ``cfg.data``, when set,
replaces ``root``; it may name either the world root or its ``eval`` folder itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from vlp_core.config import EvalConfig
from vlp_core.eval.compositional import compositional_eval
from vlp_core.eval.datasets import (
    ImageBatches,
    load_compositional_shards,
    load_imagefolder,
    load_retrieval_shards,
    load_zeroshot_shards,
)
from vlp_core.eval.retrieval import retrieval_eval
from vlp_core.eval.scorer import all_reduce_sum, dist_rank_world
from vlp_core.eval.zeroshot import zeroshot_eval
from vlp_core.method import Scorer

__all__ = ["run_evaluation", "eval_dir_for", "split_names"]

T = TypeVar("T")


def split_names(names: str) -> list[str]:
    """Comma-separated set names, blanks dropped (``""`` disables a kind of evaluation)."""
    return [n.strip() for n in names.split(",") if n.strip()]


def eval_dir_for(cfg: EvalConfig, root: str | Path) -> Path:
    """The folder holding the eval sets: ``<cfg.data or root>/eval``, or that folder itself if it has none."""
    base = Path(cfg.data) if cfg.data else Path(root)
    return base / "eval" if (base / "eval").is_dir() else base


def _set_folder(eval_dir: Path, name: str, kind: str) -> Path:
    folder = eval_dir / name
    if not folder.is_dir():
        raise ValueError(f"{kind} eval set '{name}' not found: {folder}")
    return folder


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
) -> dict[str, float]:
    """Zero-shot, retrieval, compositional and ImageFolder evaluation as configured.

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

    Returns:
        Flat metrics such as ``"zeroshot_color_shape/top1"``, ``"retrieval/i2t_R@1"``,
        ``"compositional/accuracy"`` and ``"<set>/skipped"`` (undecodable or malformed samples), identical
        on every rank.

    Raises:
        ValueError: A named set's folder (or the ImageFolder root) does not exist.
    """
    device = torch.device(device)
    rank, world = dist_rank_world()
    show = progress and rank == 0
    eval_dir = eval_dir_for(cfg, root)
    bs = cfg.batch_size
    common: dict[str, Any] = {"image_size": image_size, "rank": rank, "world_size": world, "batch_size": bs}
    run_kw: dict[str, Any] = {"device": device, "batch_size": bs, "dtype": dtype}
    # Resolve every folder first: a typo in the last name should fail before minutes of evaluation.
    zeroshot = [(n, _set_folder(eval_dir, n, "zero-shot")) for n in split_names(cfg.zeroshot)]
    retrieval = [(n, _set_folder(eval_dir, n, "retrieval")) for n in split_names(cfg.retrieval)]
    compositional = [(n, _set_folder(eval_dir, n, "compositional")) for n in split_names(cfg.compositional)]
    if cfg.imagefolder and not Path(cfg.imagefolder).is_dir():
        raise ValueError(f"eval.imagefolder root not found: {cfg.imagefolder}")

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
            scorer, _progress(batches, "imagefolder", show), classnames, templates, tokenizer, **run_kw
        )
        record("imagefolder", {**metrics, "skipped": _skipped(batches, device)})

    for name, folder in retrieval:
        batches, captions, caption_to_image = load_retrieval_shards(folder, **common)
        metrics = retrieval_eval(
            scorer, _progress(batches, name, show), captions, caption_to_image, tokenizer, **run_kw
        )
        record(name, {**metrics, "skipped": _skipped(batches, device)})

    for name, folder in compositional:
        batches = load_compositional_shards(folder, **common)
        metrics = compositional_eval(scorer, _progress(batches, name, show), tokenizer, **run_kw)
        record(name, {**metrics, "skipped": _skipped(batches, device)})
    return results
