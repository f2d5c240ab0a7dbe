"""Reading and writing webdataset shards: tar files whose members ``<key>.<ext>`` group into samples.

Our own reader (``tarfile`` in stream mode plus webdataset's public ``gopen`` for ``pipe:`` and URLs) so that
the sample stream is deterministic and a truncated shard ends cleanly with a count instead of a traceback.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand

__all__ = ["expand_urls", "iter_samples", "ShardWriter", "open_url", "CorruptShard"]

log = logging.getLogger(__name__)


class CorruptShard(Exception):
    """A shard whose tar stream broke off; raised after the samples read before the break were yielded."""


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (``shards/{00000..00009}.tar``); several patterns may be joined by ``::``."""
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def open_url(url: str):
    """Open a local path, ``pipe:cmd`` or remote URL for binary reading."""
    if "://" in url or url.startswith("pipe:"):
        import webdataset

        return webdataset.gopen(url, "rb")
    if not os.path.exists(url):
        raise FileNotFoundError(f"shard not found: {url}")
    return open(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dirname = os.path.dirname(name)
    if "." not in base:
        return name, ""
    key, ext = base.split(".", 1)
    return (f"{dirname}/{key}" if dirname else key), ext.lower()


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield samples ``{"__key__", "__url__", ext: bytes, ...}`` from one shard, in file order.

    Members of one key must be adjacent (as webdataset writers produce them). A stream that breaks off
    (truncated file, bad header) raises :class:`CorruptShard` after yielding every complete sample before it.
    """
    current: dict[str, Any] | None = None
    with open_url(url) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = _split_name(member.name)
                    if key.startswith("__") or not ext:
                        continue
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} truncated")
                    if current is not None and current["__key__"] != key:
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = data
        except (tarfile.ReadError, EOFError, OSError) as e:
            raise CorruptShard(f"{url}: {e}") from e
    if current is not None:
        yield current


class ShardWriter:
    """Write samples into numbered shards ``<pattern % index>`` with at most ``max_count`` samples each.

    Each shard is written to a temporary name and renamed when complete, so a crash never leaves a
    half-written shard under the final name.
    """

    def __init__(self, pattern: str, *, max_count: int = 1000) -> None:
        self.pattern = pattern
        self.max_count = max_count
        self.index = 0
        self.count = 0
        self.total = 0
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp = ""

    def _open(self) -> None:
        name = self.pattern % self.index
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = name + ".tmp"
        self._tar = tarfile.open(self._tmp, "w")
        self.shards.append(name)
        self.count = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._tmp, self.shards[-1])
            self._tar = None
            self.index += 1

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample: ``__key__`` plus ``ext -> bytes | str`` members."""
        if self._tar is None or self.count >= self.max_count:
            self._close()
            self._open()
        key = sample["__key__"]
        assert self._tar is not None
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # reproducible shards
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        self.total += 1

    def close(self) -> None:
        self._close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
