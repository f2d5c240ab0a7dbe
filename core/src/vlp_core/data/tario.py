"""Reading and writing webdataset shards: tar files whose members ``<key>.<ext>`` group into samples.

Our own reader (``tarfile`` in stream mode plus webdataset's public ``gopen`` for ``pipe:`` and URLs) so that
the sample stream is deterministic and a truncated shard ends cleanly with a count instead of a traceback.

Local uncompressed tars can *seek*: :func:`iter_positioned` reports the byte offset of every sample's first
member header and the offset just past its last member, and both it and :func:`read_sample_at` reopen a shard
at such an offset, so a resumed training run reads from where it stopped instead of from the shard's start.
``pipe:`` commands, URLs and compressed tars cannot: their offsets are ``None``. ``READS`` counts the tar
members whose data was read (``"members"``) and the shards opened (``"opens"``) in this process.

A shard fails in one of three ways, each its own exception raised after the complete samples read before it:
a missing local file (``FileNotFoundError``), a tar stream that breaks off (:class:`CorruptShard`) and a
``pipe:`` command or URL download that cannot start or exits with an error (:class:`BadShard`).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import braceexpand

__all__ = ["expand_urls", "iter_samples", "iter_positioned", "read_sample_at", "ShardWriter", "open_url",
           "CorruptShard", "BadShard", "is_local", "READS"]

log = logging.getLogger(__name__)

READS: Counter[str] = Counter()  # "members": tar members whose data was read; "opens": shards opened


class CorruptShard(Exception):
    """A shard whose tar stream broke off; raised after the samples read before the break were yielded."""


class BadShard(Exception):
    """A ``pipe:`` or URL shard whose command could not start or exited with an error status (a failed
    download, a missing object, a broken command); raised after the samples read before the failure."""


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (``shards/{00000..00009}.tar``); several patterns may be joined by ``::``."""
    urls: list[str] = []
    for part in pattern.split("::"):
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def open_url(url: str):
    """Open a local path, ``pipe:cmd`` or remote URL for binary reading.

    ``pipe:`` and URLs go through webdataset's ``gopen`` (a subprocess: the command, or ``curl``); one that
    cannot be started raises :class:`BadShard`. A command that starts but fails is reported when its stream
    is closed (:func:`iter_positioned` turns that into :class:`BadShard` as well).
    """
    if "://" in url or url.startswith("pipe:"):
        import webdataset

        try:
            return webdataset.gopen(url, "rb")
        except (OSError, ValueError) as e:  # no handler for the scheme, curl not installed...
            raise BadShard(f"{url}: cannot open: {e}") from None
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


def is_local(url: str) -> bool:
    """A path on this machine (not ``pipe:`` and not a URL): the only kind of shard that can seek."""
    return "://" not in url and not url.startswith("pipe:")


def _member_end(member: tarfile.TarInfo) -> int:
    """Offset just past the member's data blocks (relative to where the tar stream was opened)."""
    return member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _open_local_at(url: str, offset: int):
    """The local shard opened at ``offset``, or ``None`` when no tar header starts there.

    ``tarfile`` ends a stream silently at a zero, short or invalid header found after the first member; a
    shard opened in its middle must end the same way instead of reporting an empty or broken archive.
    """
    stream = open_url(url)
    stream.seek(offset)
    try:
        tarfile.TarInfo.frombuf(stream.read(tarfile.BLOCKSIZE), tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError:
        stream.close()
        return None
    stream.seek(offset)
    return stream


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    data = f.read() if f is not None else b""
    READS["members"] += 1
    if len(data) != member.size:
        raise tarfile.ReadError(f"member {member.name} truncated")
    return data


def _sample_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """``(member, key, ext)`` for every member that belongs to a sample (files named ``<key>.<ext>``)."""
    for member in tar:
        if not member.isfile():
            continue
        key, ext = _split_name(member.name)
        if key.startswith("__") or not ext:
            continue
        yield member, key, ext


def iter_positioned(url: str, offset: int = 0) -> Iterator[tuple[dict[str, Any], int | None, int | None]]:
    """Yield ``(sample, start, end)`` from one shard, in file order, beginning at byte ``offset``.

    ``start`` is the byte offset of the sample's first member header, ``end`` the offset just past its last
    member's data (where the next sample's header starts); both are ``None`` when the shard cannot seek
    (``pipe:``, URLs, compressed tars, a pax global header). A non-zero ``offset`` needs a local shard.
    Members of one key must be adjacent (as webdataset writers produce them). A stream that breaks off
    (truncated file, bad header) raises :class:`CorruptShard` after yielding every complete sample before it.
    """
    if offset and not is_local(url):
        raise ValueError(f"{url}: only a local shard can be opened at byte {offset}")
    stream = _open_local_at(url, offset) if offset else open_url(url)
    if stream is None:
        return
    READS["opens"] += 1
    current: dict[str, Any] | None = None
    start: int | None = None
    end: int | None = None
    broke: Exception | None = None
    closed = False
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|" if offset else "r|*") as tar:
                seekable = is_local(url) and getattr(tar.fileobj, "comptype", "") == "tar"
                for member, key, ext in _sample_members(tar):
                    data = _read_member(tar, member)
                    if current is not None and current["__key__"] != key:
                        yield current, start, end
                        current = None
                    seekable = seekable and not tar.pax_headers
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                        start = offset + member.offset if seekable else None
                    current[ext] = data
                    end = offset + _member_end(member) if seekable else None
        except (tarfile.ReadError, EOFError, OSError) as e:
            broke = e
        # A pipe reports its command's exit status on close: a failed command is the cause of whatever the
        # tar stream did, and its last sample is not to be trusted.
        closed, failed = True, _close(stream)
        if failed is None and isinstance(broke, OSError) and not is_local(url) and ": exit " in str(broke):
            failed = _pipe_failure(broke)  # the pipe reported its exit status while being read
        if failed is not None:
            raise BadShard(f"{url}: {failed}") from None
        if broke is not None:
            raise CorruptShard(f"{url}: {broke}") from broke
    finally:
        if not closed:  # the reader stopped mid-shard: a pipe then dies of SIGPIPE, which is no failure
            _close(stream)
    if current is not None:
        yield current, start, end


def _close(stream) -> str | None:
    """Close a shard's stream; for a ``pipe:``/URL, the failure of its command (``None`` when it succeeded)."""
    try:
        stream.close()
    except OSError as e:
        return _pipe_failure(e)
    return None


def _pipe_failure(e: OSError) -> str:
    """webdataset's ``Pipe`` error (``(args, kwargs): exit N (read) ...``) as ``command ... exited with N``."""
    text = str(e)
    status = text.rsplit(": exit ", 1)[1].split()[0] if ": exit " in text else ""
    return f"the command exited with status {status}" if status else f"the command failed: {text}"


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield samples ``{"__key__", "__url__", ext: bytes, ...}`` from one shard, in file order.

    Members of one key must be adjacent (as webdataset writers produce them). A stream that breaks off
    (truncated file, bad header) raises :class:`CorruptShard` after yielding every complete sample before it.
    """
    for sample, _, _ in iter_positioned(url):
        yield sample


def read_sample_at(url: str, offset: int) -> dict[str, Any]:
    """The one sample whose first member header starts at byte ``offset`` of a local uncompressed tar.

    Reads only that sample's members (and the next member's header). Raises ``ValueError`` naming the shard
    and offset when no sample starts there (a shard changed or replaced since the offset was recorded).
    """
    problem = "no tar member starts there"
    sample: dict[str, Any] = {}
    stream = _open_local_at(url, offset) if is_local(url) and os.path.exists(url) else None
    if stream is not None:
        READS["opens"] += 1
        try:
            with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member, key, ext in _sample_members(tar):
                    if sample and sample["__key__"] != key:
                        break
                    sample.setdefault("__key__", key)
                    sample.setdefault("__url__", url)
                    sample[ext] = _read_member(tar, member)
        except (tarfile.ReadError, EOFError, OSError) as e:
            problem, sample = str(e), {}
    elif not (is_local(url) and os.path.exists(url)):
        problem = "the shard is not a local file"
    if not sample:
        raise ValueError(f"cannot read the sample at byte {offset} of shard {url}: {problem} "
                         "(was the shard changed since the data position was saved?)")
    return sample


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
