"""Checkpoint conversion: vlp's safe loader, the reader/writer registry and the ``vlp-convert`` command.

Importing this package is light (the registry and the safe loader); the built-in readers/writers register
when :func:`load_converters` imports them (``vlp-convert`` does that first, with every installed method).
"""

from __future__ import annotations

import importlib
import importlib.util

from vlp_core.convert.registry import (
    READERS,
    WRITERS,
    ConversionError,
    Converted,
    Reader,
    Source,
    Writer,
    detect_reader,
    register_reader,
    register_writer,
)
from vlp_core.convert.safe_load import read_source, read_weights_file

__all__ = [
    "READERS",
    "WRITERS",
    "ConversionError",
    "Converted",
    "Reader",
    "Source",
    "Writer",
    "detect_reader",
    "register_reader",
    "register_writer",
    "read_source",
    "read_weights_file",
    "load_converters",
    "load_vlp_checkpoint",
    "read_checkpoint",
]

# Built-in converter modules, registered on import (those not present in this install are skipped).
BUILTIN_MODULES = ("vlp_format", "openai_clip", "hf", "hf_write", "eva")


def load_converters() -> None:
    """Register the built-in readers/writers, then import every installed method (``vlp.methods``)."""
    for name in BUILTIN_MODULES:
        module = f"{__name__}.{name}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    from vlp_core.convert.build import load_methods

    load_methods()


def load_vlp_checkpoint(path):  # type: ignore[no-untyped-def]
    """See :func:`vlp_core.convert.vlp_format.load_vlp_checkpoint` (imported lazily: it needs the trainer)."""
    from vlp_core.convert.vlp_format import load_vlp_checkpoint as _load

    return _load(path)


def read_checkpoint(path, arch=None):  # type: ignore[no-untyped-def]
    """Any checkpoint ``vlp-convert`` reads, converted to vlp's layout and checked (what ``vlp-convert`` does
    before writing).

    A trainer ``step_<n>.pt`` (or run folder) is read with the trainer's trusted loader, anything else with the
    safe loader; the layout is detected among the registered readers (built-in and installed methods'),
    ``arch`` is ``--arch``, and the weights must load strictly into the model the converted config builds.

    Returns:
        :class:`Converted`.

    Raises:
        ConversionError: Unknown layout, unsafe or unreadable file, missing/unexpected keys, wrong shapes.
    """
    import logging

    from vlp_core.convert.build import check_converted
    from vlp_core.convert.vlp_format import is_trainer_checkpoint, read_trainer_checkpoint

    load_converters()
    source = read_trainer_checkpoint(path) if is_trainer_checkpoint(path) else read_source(path)
    reader = detect_reader(source)
    logging.getLogger("vlp").info("%s: detected layout %r", source.path, reader.name)
    converted = reader.read(source, arch)
    check_converted(converted)
    return converted
