"""vlp's own checkpoint file: reader and writer ``vlp``, and :func:`load_vlp_checkpoint` for the CLIs.

A vlp checkpoint is one ``.safetensors`` file holding the trainer's ``TrainStep`` state dict (``model.*``,
``loss.*``) with the metadata::

    {"format": "vlp", "version": "1", "config": <RunConfig as YAML>, "layout": <source layout>, "step": "<n>"}

It is written atomically (``<name>.tmp``, fsync, rename) and read without pickle.

The trainer's own checkpoints (``step_<n>.pt`` files and ``step_<n>/`` DCP folders) are read through
``CheckpointManager.load``: every pickle in them is loaded weights-only by the core's one safe loader, after
the checkpoint's commit record (sizes, checksums) has been checked; a file holding anything else is refused,
naming it. The one pickle read otherwise is DCP's own ``.metadata``, and only from a run folder you name.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from vlp_core.config import dump_yaml, to_dict
from vlp_core.convert.build import check_converted, run_config_from_dict
from vlp_core.convert.registry import (
    ConversionError,
    Converted,
    Reader,
    Source,
    Writer,
    register_reader,
    register_writer,
)
from vlp_core.convert.safe_load import read_weights_file
from vlp_core.train.checkpoint import atomic_write

__all__ = [
    "FORMAT",
    "VERSION",
    "atomic_write",
    "unshared",
    "save_vlp_checkpoint",
    "load_vlp_checkpoint",
    "is_trainer_checkpoint",
    "read_trainer_checkpoint",
    "read_vlp",
]

log = logging.getLogger("vlp")

FORMAT = "vlp"
VERSION = "1"


def unshared(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, none sharing storage with another (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_vlp_checkpoint(converted: Converted, path: str | Path, *, check: bool = True) -> None:
    """Write ``converted`` as a vlp checkpoint (``.safetensors``, atomically).

    Args:
        converted: ``TrainStep`` state dict, run config and source layout.
        path: Output file; must end with ``.safetensors``.
        check: First verify the weights load strictly into the model the config builds.

    Raises:
        ConversionError: Wrong suffix, or weights that do not fit the config's model.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"vlp checkpoints are .safetensors files, not {path.name}")
    if check:
        check_converted(converted)
    metadata = {"format": FORMAT, "version": VERSION, "config": dump_yaml(converted.config),
                "layout": converted.layout, "step": str(int(converted.step))}
    tensors = unshared(converted.state_dict)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def is_trainer_checkpoint(path: str | Path) -> bool:
    """A trainer checkpoint (``step_<n>.pt`` file or finished ``step_<n>/`` DCP folder), or a run / checkpoints
    folder holding one."""
    from vlp_core.train.checkpoint import is_trainer_checkpoint as is_checkpoint

    p = Path(path).expanduser()
    if is_checkpoint(p):
        return True
    if p.is_dir():
        return _latest_trainer_checkpoint(p) is not None
    return False


def _latest_trainer_checkpoint(folder: Path) -> Path | None:
    from vlp_core.train.checkpoint import CheckpointManager

    sub = folder / "checkpoints"
    return CheckpointManager(sub if sub.is_dir() else folder).latest()


def read_trainer_checkpoint(path: str | Path) -> Source:
    """Read a trainer checkpoint through ``CheckpointManager.load`` (weights-only, commit record checked).

    Args:
        path: A ``step_<n>.pt`` file or a run folder (its newest checkpoint).

    Returns:
        A :class:`Source` with the ``TrainStep`` state dict and ``meta = {"format": "vlp-trainer",
        "config": <config dict>, "step": <int>}``.
    """
    from vlp_core.train.checkpoint import is_trainer_checkpoint as is_checkpoint
    from vlp_core.train.checkpoint import load_full_state

    p = Path(path).expanduser()
    if p.is_dir() and not is_checkpoint(p):
        found = _latest_trainer_checkpoint(p)
        if found is None:
            raise ConversionError(f"{p} holds no trainer checkpoint (step_<n>.pt or step_<n>/)")
        p = found
    if not is_checkpoint(p):
        raise ConversionError(f"{p} is not a trainer checkpoint (step_<n>.pt or a finished step_<n>/ DCP folder)")
    log.info("%s: vlp trainer checkpoint, read weights-only after checking its commit record", p)
    try:
        saved = load_full_state(p)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(saved, dict) or not {"model", "config", "step"} <= set(saved):
        raise ConversionError(f"{p} is not a vlp trainer checkpoint (no model/config/step entries)")
    return Source(path=p, state_dict=dict(saved["model"]),
                  meta={"format": "vlp-trainer", "config": saved["config"], "step": int(saved["step"])})


def _vlp_meta(source: Source) -> dict[str, Any] | None:
    """The vlp metadata of ``source`` (config as a dict, step as an int), or None if it is not vlp's."""
    if source.meta.get("format") == "vlp-trainer":
        return {"config": source.meta["config"], "step": source.meta["step"], "layout": "vlp"}
    md = source.meta.get("safetensors_metadata") or {}
    if md.get("format") != FORMAT:
        return None
    if md.get("version") != VERSION:
        raise ConversionError(f"{source.path}: vlp checkpoint version {md.get('version')!r}; this vlp reads "
                              f"version {VERSION}")
    try:
        config = yaml.safe_load(md.get("config", ""))
        step = int(md.get("step", "0"))
    except (yaml.YAMLError, ValueError) as e:
        raise ConversionError(f"{source.path}: vlp checkpoint with unreadable metadata ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{source.path}: vlp checkpoint without a run config in its metadata")
    return {"config": config, "step": step, "layout": md.get("layout", "vlp")}


def _detect(source: Source) -> bool:
    return source.meta.get("format") == "vlp-trainer" or (
        (source.meta.get("safetensors_metadata") or {}).get("format") == FORMAT
    )


def read_vlp(source: Source, arch: str | None = None) -> Converted:
    """A vlp checkpoint (or trainer checkpoint) as :class:`Converted`; ``arch`` is ignored."""
    meta = _vlp_meta(source)
    if meta is None:
        raise ConversionError(f"{source.path} is not a vlp checkpoint")
    if arch is not None:
        log.warning("--arch %s ignored: a vlp checkpoint records its own config", arch)
    cfg = run_config_from_dict(meta["config"])
    log.info("%s: vlp checkpoint (originally %s, step %d, method %s)", source.path, meta["layout"], meta["step"],
             cfg.method)
    return Converted(state_dict=dict(source.state_dict), config=cfg, layout="vlp", step=meta["step"])


def load_vlp_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], int]:
    """``(TrainStep state dict, config dict, step)`` of a vlp checkpoint, for ``<m>-eval`` / ``--init-from``.

    Args:
        path: A vlp ``.safetensors`` checkpoint (read without pickle), or a trainer ``step_<n>.pt`` / run
            folder (read weights-only with ``CheckpointManager.load``).

    Raises:
        ConversionError: Anything else (a foreign checkpoint needs ``vlp-convert`` first).
    """
    p = Path(path).expanduser()
    if is_trainer_checkpoint(p):
        source = read_trainer_checkpoint(p)
        return source.state_dict, to_dict(source.meta["config"]), int(source.meta["step"])
    state_dict, file_meta = read_weights_file(p)
    source = Source(path=p, state_dict=state_dict, meta=file_meta)
    meta = _vlp_meta(source)
    if meta is None:
        raise ConversionError(f"{p} is not a vlp checkpoint; convert it first: vlp-convert {p} out.safetensors")
    return state_dict, meta["config"], int(meta["step"])


def write_vlp(converted: Converted, out: Path) -> None:
    save_vlp_checkpoint(converted, out)
    log.info("wrote %s (vlp checkpoint, method %s, from %s)", out, converted.config.method, converted.layout)


register_reader(Reader(
    name="vlp", priority=100, detect=_detect, read=read_vlp,
    description="vlp checkpoint (.safetensors with format=vlp metadata), or a vlp trainer step_<n>.pt / run "
                "folder (read weights-only)",
))
register_writer(Writer(
    name="vlp", write=write_vlp,
    description="vlp checkpoint .safetensors (TrainStep state dict + RunConfig YAML), for <method>-eval and "
                "--init-from",
))
