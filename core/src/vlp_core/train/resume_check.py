"""Resume with other data settings than the checkpoint's: warn (the data order changes) or stop.

A resume is bit-exact only when the data stream continues where it stopped, which needs the settings that
decide which samples come in which order to be the checkpoint's. :func:`data_differences` compares the
run config stored in a checkpoint (``config``, :func:`vlp_core.config.to_dict` of the writing run) with the
current one on those keys:

- the stream: ``data.train_data``, ``data.train_weights``, ``data.resampled``, ``data.seed``,
  ``data.shuffle_buffer`` (0 and 1 both mean no shuffling), ``data.workers`` (0 and 1 both mean one consumer
  per rank), and, when both runs train on the generated shapes world (empty ``data.train_data``), the world's
  ``data.world_dir``, ``data.world_seed``, ``data.world_train_samples`` and ``data.world_noise``;
- the batches and their contents: ``train.batch_size`` (the global batch: which samples make a step),
  ``data.augment`` and ``data.max_image_pixels`` (which samples are skipped);
- the world size (a DCP checkpoint resumed on another number of ranks; ``_restore`` reshards it).

Not compared: ``train.accum_steps`` (the loader reads each rank's whole step batch and accumulation splits
it, so the samples of a step do not depend on it), ``train.seed`` (the RNG states come from the checkpoint),
and a method's own ``loss.*`` keys.

:func:`check_resume` acts on the differences: with ``train.strict_resume=true`` it raises a one-line
``ValueError`` (every rank computes the same differences, so every rank stops); otherwise rank 0 logs one
warning listing them. When the stream itself changed, the saved data positions describe another stream
(the data loader would refuse them), so the stream restarts as on a resume on another world size: each
consumer skips an equal share of the samples consumed so far, keeping the global sample count.
"""

from __future__ import annotations

import logging
from typing import Any

from vlp_core.config import RunConfig, to_dict
from vlp_core.distributed import is_main

__all__ = ["data_differences", "check_resume", "STREAM_KEYS", "BATCH_KEYS", "WORLD_KEYS"]

log = logging.getLogger("vlp")

STREAM_KEYS = ("data.train_data", "data.train_weights", "data.resampled", "data.seed", "data.shuffle_buffer",
               "data.workers")
WORLD_KEYS = ("data.world_dir", "data.world_seed", "data.world_train_samples", "data.world_noise")
BATCH_KEYS = ("train.batch_size", "data.augment", "data.max_image_pixels")

_MISSING = object()


def _get(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _normal(key: str, value: Any) -> Any:
    """The value as the data stream sees it: equivalent settings compare equal."""
    if key == "data.workers" and isinstance(value, int):
        return max(value, 1)
    if key == "data.shuffle_buffer" and isinstance(value, int):
        return value if value > 1 else 0
    return value


def data_differences(saved_config: dict[str, Any] | None, cfg: RunConfig, *, saved_world: int | None = None,
                     world: int | None = None) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint's value, this run's value)`` for each data setting that differs (see the module doc).

    Keys the stored config lacks (a checkpoint from an older vlp) are not compared; an empty or missing
    ``saved_config`` gives no differences. ``saved_world``/``world``: the world sizes, compared under the key
    ``world_size`` when both are given.
    """
    if not isinstance(saved_config, dict) or not saved_config:
        return []
    now = to_dict(cfg)
    keys = list(STREAM_KEYS)
    if not _get(saved_config, "data.train_data") and not cfg.data.train_data:
        keys += WORLD_KEYS  # both on the shapes world: the world is the data
    keys += BATCH_KEYS
    out = []
    for key in keys:
        old = _get(saved_config, key)
        if old is _MISSING:
            continue
        new = _get(now, key)
        if _normal(key, old) != _normal(key, new):
            out.append((key, old, new))
    if saved_world is not None and world is not None and saved_world != world:
        out.append(("world_size", saved_world, world))
    return out


def check_resume(path: Any, shared: dict[str, Any], records: list[dict[str, Any]], state: Any, cfg: RunConfig,
                 info: Any, workers: int, rank_batch: int) -> list[tuple[str, Any, Any]]:
    """After the trainer restored ``state`` from checkpoint ``path``: warn about, or refuse, changed data settings.

    Args:
        path: The checkpoint (for the messages).
        shared: Its shared part (holding ``config``).
        records: Its per-rank records (their ``samples``: samples each rank had consumed).
        state: The trainer's restored loop state; its ``data`` (consumer positions), ``base`` and ``batches``
            are reset here when the stream changed on the same world size.
        cfg: This run's config (``train.strict_resume``: stop instead of warning).
        info: This rank's ``DistInfo`` (rank, world size).
        workers: Consumers per rank (``max(data.workers, 1)``).
        rank_batch: Samples per step on this rank (all accumulation chunks).

    Returns:
        The differences (empty: an exact resume as far as the data goes).
    """
    diffs = data_differences(shared.get("config"), cfg, saved_world=len(records), world=info.world_size)
    if not diffs:
        return diffs
    listed = ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in diffs)
    if cfg.train.strict_resume:
        raise ValueError(f"train.strict_resume: {path} was written with other data settings ({listed}); the data "
                         "order would differ from the uninterrupted run: resume with the checkpoint's settings, or "
                         "set train.strict_resume=false to go on anyway")
    if [k for k, _, _ in diffs] == ["world_size"]:
        return diffs  # the trainer's _restore has resharded and said so
    restart = ""
    stream = {k for k, _, _ in diffs} & set(STREAM_KEYS + WORLD_KEYS)
    if stream and len(records) == info.world_size:  # (another world size: restarted by _restore already)
        total = sum(int(r["samples"]) if "samples" in r else int(r["batches"]) * rank_batch for r in records)
        share = total // (info.world_size * workers)
        state.data = dict.fromkeys(range(workers), share)
        state.base = total // info.world_size + (info.rank < total % info.world_size)
        state.batches = 0
        restart = (f"; the data stream restarts with each of the {info.world_size * workers} consumers skipping "
                   f"{share} samples (same global sample count, {total})")
    if is_main():
        log.warning("resuming %s with data settings that differ from the checkpoint's (%s): the data order will "
                    "differ from the uninterrupted run%s (train.strict_resume=true stops instead)", path, listed,
                    restart)
    return diffs
