"""The converter registry: readers turn a foreign checkpoint into vlp's layout, writers turn vlp's layout out.

vlp's layout is the state dict of the trainer's ``TrainStep`` (``model.*`` for the method's model,
``loss.*`` for the loss module's learnable temperature/bias and state) together with the ``RunConfig`` that
builds that model. A reader is chosen by its ``detect`` on the source's keys (and, for folders, the files
it holds); ``--arch`` picks the architecture where the keys cannot tell (e.g. GELU vs QuickGELU).

Method packages register their own layouts at import time with :func:`register_reader` /
:func:`register_writer` (``vlp-convert`` imports every installed method through the ``vlp.methods`` entry
points first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from vlp_core.config import RunConfig

__all__ = [
    "Source",
    "Converted",
    "Reader",
    "Writer",
    "READERS",
    "WRITERS",
    "register_reader",
    "register_writer",
    "detect_reader",
    "ConversionError",
    "listing",
    "key_problems",
    "shape_mismatches",
]

SHOW = 5  # keys named in an error message before "(+N more)"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: unknown layout, missing/unexpected keys, wrong shapes."""


def listing(items: Sequence[str], show: int = SHOW) -> str:
    """The first ``show`` items, comma-separated, then ``(+N more)``: how an error message names keys."""
    more = f" (+{len(items) - show} more)" if len(items) > show else ""
    return ", ".join(items[:show]) + more


def key_problems(missing: Sequence[str], unexpected: Sequence[str] = (), mismatched: Sequence[str] = ()) -> str:
    """``missing keys: ...; unexpected keys: ...; shape mismatch: ...`` for the lists that are not empty.

    Returns:
        The parts joined by ``"; "``, each a :func:`listing`; ``""`` when all three lists are empty.
    """
    parts = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
    return "; ".join(f"{label}: {listing(keys)}" for label, keys in parts if keys)


def shape_mismatches(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, tuple[int, ...]], keys: Iterable[str]
) -> list[str]:
    """``"key (shape) vs model (expected shape)"`` for each of ``keys`` (in order) that ``state_dict`` and
    ``expected`` both hold with different shapes."""
    return [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k])}" for k in keys
            if k in state_dict and k in expected and tuple(state_dict[k].shape) != tuple(expected[k])]


@dataclass
class Source:
    """What was read from the user's path, before any conversion.

    Attributes:
        path: The file or folder named by the user.
        state_dict: Every tensor, keys as stored (wrapper prefixes such as ``module.`` already stripped).
        files: For a folder, the names of the files it holds (``config.json`` tells HF models apart);
            empty for a single file.
        meta: Anything else the reading step learned (e.g. ``{"jit": True}``, a HF ``config.json`` dict, the
            safetensors metadata).
    """

    path: Path
    state_dict: dict[str, Tensor]
    files: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Converted:
    """A checkpoint in vlp's layout.

    Attributes:
        state_dict: ``TrainStep`` keys: ``model.*`` and ``loss.*``.
        config: The run config that builds the model (method, towers, tokenizer, preprocessing, loss).
        layout: Name of the reader that produced it (logged, and kept in the written file).
        step: Training step the weights come from (a vlp trainer checkpoint's; 0 for foreign checkpoints).
    """

    state_dict: dict[str, Tensor]
    config: RunConfig
    layout: str
    step: int = 0


@dataclass(frozen=True)
class Reader:
    """One source layout.

    Attributes:
        name: Short name (``openai``, ``open_clip``, ``hf-clip``, ``hf-siglip``, ``timm-eva``, ``vlp``, ...).
        description: One line for ``vlp-convert --list``.
        detect: ``detect(source) -> bool``: whether the keys/files are this layout.
        read: ``read(source, arch) -> Converted``; ``arch`` is ``--arch`` or None. Raises
            :class:`ConversionError` naming the keys that do not fit.
        priority: Higher is tried first (specific layouts before generic ones).
    """

    name: str
    description: str
    detect: Callable[[Source], bool]
    read: Callable[[Source, str | None], Converted]
    priority: int = 0


@dataclass(frozen=True)
class Writer:
    """One target format: ``write(converted, out_path)`` (a file or a folder, by format)."""

    name: str
    description: str
    write: Callable[[Converted, Path], None]


READERS: dict[str, Reader] = {}
WRITERS: dict[str, Writer] = {}


def register_reader(reader: Reader) -> Reader:
    READERS[reader.name] = reader
    return reader


def register_writer(writer: Writer) -> Writer:
    WRITERS[writer.name] = writer
    return writer


def detect_reader(source: Source, readers: Mapping[str, Reader] | None = None) -> Reader:
    """The highest-priority reader whose ``detect`` accepts ``source``.

    Raises:
        ConversionError: No reader recognises the keys; the message lists the first few keys.
    """
    readers = READERS if readers is None else readers
    for reader in sorted(readers.values(), key=lambda r: -r.priority):
        if reader.detect(source):
            return reader
    sample = ", ".join(sorted(source.state_dict)[:6]) or "(no tensors)"
    raise ConversionError(
        f"{source.path}: unknown checkpoint layout (known: {', '.join(sorted(readers))}); keys look like: {sample}"
    )
