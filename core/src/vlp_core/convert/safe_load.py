"""The one place where vlp reads foreign weights: a file or folder into a :class:`~vlp_core.convert.registry.Source`.

Accepted:
    - ``*.safetensors`` (its metadata is kept in ``meta["safetensors_metadata"]``);
    - ``*.pt`` / ``*.pth`` / ``*.bin`` / ``*.ckpt`` read with ``torch.load(weights_only=True)`` only. A pickle
      that needs anything beyond tensors and plain containers is refused (it may run code when loaded) and
      nothing of it is loaded;
    - OpenAI's TorchScript archives (a zip holding ``constants.pkl`` / ``code/``), read with
      ``torch.jit.load(path, map_location="cpu").state_dict()``. This is the documented exception to
      "weights only": TorchScript is a restricted language, not arbitrary Python, and OpenAI's CLIP releases
      exist only in this form. ``meta["jit"]`` is True for them;
    - a folder holding one of :data:`WEIGHT_FILES` (or a sharded ``*.index.json`` of them), plus its
      ``config.json`` / ``open_clip_config.json`` (parsed into ``meta["config"]`` / ``meta["open_clip_config"]``).

Clean-up: a dict wrapping the weights under ``"state_dict"`` or ``"model"`` (trainer checkpoints) is
unwrapped one level, and leading ``module.`` (DistributedDataParallel) / ``_orig_mod.`` (``torch.compile``)
are stripped from every key, in any order.

Anything else (text, random bytes, a zip that is no checkpoint, an empty file) is a ``ConversionError``
(a ``ValueError``) whose one-line message names the file.

:func:`load_weights_only` is vlp's one ``torch.load``: this module's ``.pt`` reader and the trainer's own
checkpoints (:mod:`vlp_core.train.checkpoint`: the ``step_<n>.pt`` file, a DCP folder's ``meta.pt`` and
``ranks/rank_<r>.pt``) all go through it, so no pickle vlp reads can run code. The two documented exceptions
are OpenAI's TorchScript archives above and the ``.metadata`` pickle of a DCP checkpoint folder, which
``torch.distributed.checkpoint`` reads itself (only from run folders the user names: ``--resume``,
``<m>-eval RUN``).
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp_core.convert.registry import ConversionError, Source

__all__ = [
    "WEIGHT_FILES",
    "TORCH_SUFFIXES",
    "read_source",
    "read_weights_file",
    "strip_wrapper_prefixes",
    "is_torchscript_archive",
    "load_weights_only",
]

# Looked for, in this order, inside a folder.
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)
TORCH_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".ckpt")
_CONFIG_FILES = {"config.json": "config", "open_clip_config.json": "open_clip_config"}
_WRAPPER_KEYS = ("state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# What ``torch.save(..., _use_new_zipfile_serialization=False)`` writes first: the pickled magic number.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.visual.x`` -> ``visual.x`` (DDP around a compiled module; any order, repeated)."""
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript zip (``<name>/constants.pkl`` or ``<name>/code/...`` inside)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def _is_torch_zip(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/data.pkl") or n == "data.pkl" for n in z.namelist())


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    """One level of ``{"state_dict": ...}`` / ``{"model": ...}``, then require a flat dict of tensors."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(
            f"{path} does not hold a state dict of tensors: {', '.join(bad[:5])} "
            f"{'is not a tensor' if len(bad) == 1 else 'are not tensors'}"
        )
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; name the file instead
        raise ConversionError(f"{path} is not a valid safetensors file ({_short(e)})") from None
    return state_dict, {"format": "safetensors", "safetensors_metadata": metadata}


def _read_torchscript(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice: OpenAI's releases need it
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - name the file, not the TorchScript internals
        raise ConversionError(f"{path} looks like a TorchScript archive but cannot be loaded ({_short(e)})") from None
    state_dict = {k: v.detach() for k, v in module.state_dict().items()}
    return state_dict, {"format": "torchscript", "jit": True}


def load_weights_only(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors, plain containers and scalars only.

    The one ``torch.load`` of vlp (see the module docstring). The weights-only unpickler refuses every global
    outside torch's allowlist *before* calling it, so a hostile pickle's payload never runs.

    Raises:
        ConversionError: (a ``ValueError``) one line naming the file: a pickle that is not weights-only (and
            which global it needs), or a file that is no readable PyTorch checkpoint (truncated, damaged).
    """
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - classified below
        message = str(e)
        found = _GLOBAL.search(message)
        if found or "Weights only load failed" in message and "GLOBAL" in message:
            what = found.group(1).rstrip(".") if found else "a Python object"
            raise ConversionError(
                f"{path} is a pickle that is not weights-only (it needs {what}), so loading it may run code; "
                "it was not loaded. Re-save its tensors (a state dict or .safetensors) where you trust it"
            ) from None
        raise ConversionError(f"{path} cannot be read as a PyTorch checkpoint ({_short(e)})") from None


def _read_pickle(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return _unwrap(load_weights_only(path), path), {"format": "torch"}


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def read_weights_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read one weight file (format sniffed from its bytes, not trusted from its suffix).

    Args:
        path: A ``.safetensors``, ``.pt``/``.pth``/``.bin``/``.ckpt`` (torch zip or legacy pickle, read
            weights-only) or TorchScript file.

    Returns:
        ``(state_dict, meta)``: wrapper-unwrapped tensors with prefixes stripped, and what was learned about
        the file (``format``, ``jit``, ``safetensors_metadata``).

    Raises:
        ConversionError: A missing, empty, unsafe or non-checkpoint file (the message names it).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty, not a checkpoint")
    if path.suffix == ".safetensors":
        state_dict, meta = _read_safetensors(path)
    elif zipfile.is_zipfile(path):
        if is_torchscript_archive(path):
            state_dict, meta = _read_torchscript(path)
        elif _is_torch_zip(path):
            state_dict, meta = _read_pickle(path)
        else:
            raise ConversionError(f"{path} is a zip archive but not a PyTorch checkpoint (no data.pkl inside)")
    elif path.suffix in TORCH_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
        if head != _LEGACY_TORCH_MAGIC:
            raise ConversionError(
                f"{path} is not a checkpoint: neither a PyTorch zip, a legacy PyTorch pickle nor TorchScript"
            )
        state_dict, meta = _read_pickle(path)
    else:
        raise ConversionError(
            f"unsupported weight file {path}: expected .safetensors or one of {', '.join(TORCH_SUFFIXES)}"
        )
    stripped = {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}
    if len(stripped) != len(state_dict):
        raise ConversionError(f"{path}: keys collide once 'module.'/'_orig_mod.' prefixes are stripped")
    if not stripped:
        raise ConversionError(f"{path} holds no tensors")
    return stripped, meta


def _read_sharded(folder: Path, index_name: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index_path} is not a valid sharded-checkpoint index ({_short(e)})") from None
    state_dict: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for shard in shards:
        part, meta = read_weights_file(folder / shard)
        state_dict.update(part)
    return state_dict, {**meta, "shards": tuple(shards)}


def _read_configs(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name, key in _CONFIG_FILES.items():
        p = folder / name
        if p.is_file():
            try:
                meta[key] = json.loads(p.read_text())
            except ValueError as e:
                raise ConversionError(f"{p} is not valid JSON ({_short(e)})") from None
    return meta


def read_source(path: str | Path) -> Source:
    """Read a checkpoint file or folder (see the module docstring) into a :class:`Source`.

    Args:
        path: A weight file, or a folder holding one of :data:`WEIGHT_FILES` (or their sharded index).

    Raises:
        ConversionError: Missing path, folder without weights, unsafe pickle or non-checkpoint file.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = tuple(sorted(f.name for f in p.iterdir()))
        meta = _read_configs(p)
        found = [n for n in WEIGHT_FILES if (p / n).is_file()]
        indexes = [n + ".index.json" for n in WEIGHT_FILES if (p / f"{n}.index.json").is_file()]
        if found:
            state_dict, file_meta = read_weights_file(p / found[0])
            file_meta["weights_file"] = found[0]
        elif indexes:
            state_dict, file_meta = _read_sharded(p, indexes[0])
            file_meta["weights_file"] = indexes[0]
        else:
            raise ConversionError(f"checkpoint folder {p} holds none of {', '.join(WEIGHT_FILES)}")
        return Source(path=p, state_dict=state_dict, files=files, meta={**file_meta, **meta})
    if not p.exists():
        raise ConversionError(f"checkpoint not found: {p}")
    state_dict, meta = read_weights_file(p)
    return Source(path=p, state_dict=state_dict, meta=meta)
