"""Deterministic, exactly resumable webdataset training pipeline.

Each (rank, worker) pair is one *consumer*. A consumer reads a raw sample stream that depends only on the
seed, its consumer index and the number of consumers:

1. every source (a shard list with a weight) yields raw samples forever: in *epoch* mode the shards are
   permuted per epoch with ``seed + epoch`` (the same permutation on every consumer) and split across
   consumers (by shard when there are enough shards, else by sample); in *resampled* mode shards are drawn
   with replacement from a consumer-seeded generator;
2. a consumer-seeded generator picks the source of each sample by weight;
3. a seeded shuffle buffer reorders the raw samples.

The position of a consumer (``BatchMeta.raw``, handed back as ``start[worker]``) is a JSON-able dict: the raw
samples its shuffle buffer has emitted, the states of its generators, for every source the shard being read
and the byte offset of its next tar member, and the (source, shard, byte offset) of every member of the
shuffle buffer. On resume each consumer reopens its local shards at those offsets and refills its buffer by
reading those members, so it reads its shuffle buffer plus one sample before continuing, however far the run
had gone; the batches after resume are exactly those an uninterrupted run would have seen. Sources whose
shards cannot seek (``pipe:``, URLs, compressed tars) instead replay their stream up to the saved count
without decoding, as does an older position that is one integer. Decoding happens after the buffer;
samples the method's adapter rejects (undecodable image, an image over ``data.max_image_pixels``, empty
caption) and shards that are missing, break off or whose ``pipe:``/URL command fails are skipped and counted
(one reason each: ``bad_image``, ``missing_shard``, ``corrupt_shard``, ``bad_shard``...), and the counts
travel with the batches to the trainer (:mod:`vlp_core.data.skips` sums them over ranks for the log). A source
whose shard reads give no sample ``data.max_shard_failures`` times in a row stops the run with a
:class:`DataError` naming it, in both modes, instead of looping without a batch.

Batches from the workers are consumed round-robin by the ``DataLoader``; after ``n`` batches the next one
comes from worker ``n % W``, so on resume the workers are relabelled by that offset (``logical id``).
"""

from __future__ import annotations

import base64
import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp_core.data.tario import BadShard, CorruptShard, expand_urls, iter_positioned, read_sample_at
from vlp_core.data.transforms import set_max_image_pixels
from vlp_core.method import SampleAdapter, SkipSample

__all__ = ["Source", "parse_sources", "WdsPipeline", "build_train_loader", "BatchMeta", "position_samples",
           "DataError"]

log = logging.getLogger(__name__)

_POSITION_VERSION = 2
EXAMPLES_PER_BATCH = 5  # skip messages a consumer attaches to a batch (at most 2 of one reason)


class DataError(ValueError):
    """The data cannot feed the run (a source whose shards all fail, an adapter that rejects everything).

    A one-line message even when raised in a data loader worker: the ``DataLoader`` re-raises a worker's
    exception as ``type(message)`` with the worker's traceback prepended; that is cut back to the original
    line here, so the CLI prints one line instead of a traceback.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0
    pattern: str = ""  # the data.train_data pattern it came from (names the source in errors)

    def describe(self, index: int) -> str:
        what = self.pattern or (self.urls[0] + (f" and {len(self.urls) - 1} more" if len(self.urls) > 1 else ""))
        return f"source {index} ({what!r})"


def parse_sources(train_data: str, weights: str = "") -> list[Source]:
    """``a/{0..9}.tar::b/{0..3}.tar`` with weights ``1::2`` -> two sources. Local shards must exist."""
    patterns = [p for p in train_data.split("::") if p.strip()]
    if not patterns:
        raise ValueError("data.train_data is empty: give a shard pattern such as 'shards/{00000..00099}.tar'")
    ws = [w for w in weights.split("::") if w.strip()] if weights else []
    if ws and len(ws) != len(patterns):
        raise ValueError(f"data.train_weights has {len(ws)} weights for {len(patterns)} sources: {weights!r}")
    sources = []
    for i, pattern in enumerate(patterns):
        urls = expand_urls(pattern)
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.exists(u)]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"shard not found: {missing[0]}{more} (from data.train_data pattern {pattern!r})")
        try:
            weight = float(ws[i]) if ws else 1.0
        except ValueError:
            raise ValueError(f"data.train_weights: {ws[i]!r} is not a number") from None
        if weight <= 0:
            raise ValueError(f"data.train_weights: weight {weight} of source {pattern!r} must be positive")
        sources.append(Source(urls=tuple(urls), weight=weight, pattern=pattern.strip()))
    return sources


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in keys])


@dataclass
class BatchMeta:
    worker: int  # logical worker id
    raw: int | dict[str, Any]  # this consumer's data position after the batch: hand it back as ``start[worker]``
    skipped: dict[str, int]  # skip counts since the previous batch of this worker
    examples: list[tuple[str, str]]  # a few (reason, message naming file and key) of those skips, for the log
    samples: int = 0  # raw samples this consumer has emitted from its shuffle buffer so far


def position_samples(position: int | dict[str, Any]) -> int:
    """Raw samples a consumer had emitted at a saved data position (either format)."""
    return position if isinstance(position, int) else int(position["raw"])


def _pack_mt(state: tuple) -> dict[str, Any]:
    """``random.Random.getstate()`` as JSON-able values (625 words packed as base64)."""
    version, words, gauss = state
    return {"version": version, "words": base64.b64encode(np.asarray(words, dtype="<u4").tobytes()).decode(),
            "gauss": gauss}


def _unpack_mt(packed: dict[str, Any]) -> tuple:
    words = np.frombuffer(base64.b64decode(packed["words"]), dtype="<u4")
    return packed["version"], tuple(int(w) for w in words), packed["gauss"]


class _SourceStream:
    """The raw samples of one source for one consumer, with a cursor that can be saved and reopened.

    Each item is ``(sample, ref)`` where ``ref = (source, shard, start, ordinal)``: the shard's index in the
    source, the byte offset of the sample's first member (``None`` when the shard cannot seek) and the
    1-based count of samples this stream has yielded. The cursor (``state``) names the shard being read and
    the byte offset of its next member, so a restored stream continues from there without re-reading.
    """

    def __init__(self, owner: _Consumer, index: int) -> None:
        self.owner = owner
        self.index = index
        self.urls = list(owner.sources[index].urls)
        self.yielded = 0  # samples yielded so far (what a stream that cannot seek replays)
        self.epoch = 0
        self.slot = 0  # position of the shard in this epoch's list of shards of this consumer
        self.shard = -1  # index into urls of the shard being read
        self.offset: int | None = 0  # byte offset of its next member; None: the shard cannot seek
        self.seen = 0  # samples read this epoch (split by sample, when there are fewer shards than consumers)
        self.got = False  # whether this epoch has yielded a sample
        self.rng: dict[str, Any] | None = None  # resampled: generator state after drawing ``shard``
        # Not part of the position (they only decide when to give up on a source):
        self.failures = 0  # shard reads in a row that gave no sample
        self.last_failure = ""
        self.read_this_epoch = False  # whether a shard gave a sample this epoch (to any consumer)

    def state(self) -> dict[str, Any]:
        return {"yielded": self.yielded, "epoch": self.epoch, "slot": self.slot, "shard": self.shard,
                "offset": self.offset, "seen": self.seen, "got": self.got, "rng": self.rng}

    def load(self, state: dict[str, Any]) -> None:
        for name in ("yielded", "epoch", "slot", "shard", "offset", "seen", "got", "rng"):
            setattr(self, name, state[name])

    def _read(self, shard: int, offset: int) -> Iterator[tuple[dict[str, Any], int | None, int | None]]:
        """The shard's samples from ``offset``; a failing shard is counted and ends early.

        A read that gives no sample (missing, corrupt, failing command, or empty) counts towards the source's
        limit of failures in a row (``data.max_shard_failures``); a sample resets it. Reopening a shard at an
        offset past its last sample gives nothing and is no failure.
        """
        url = self.urls[shard]
        got, reason = False, ""
        try:
            for item in iter_positioned(url, offset):
                got, self.failures, self.read_this_epoch = True, 0, True
                yield item
        except CorruptShard as e:
            reason, message = "corrupt_shard", str(e)
        except BadShard as e:
            reason, message = "bad_shard", str(e)
        except FileNotFoundError as e:
            reason, message = "missing_shard", str(e)
        if reason:
            self.owner._note(reason, message)
            self.last_failure = f"{reason}: {message}"
        elif not got:
            self.last_failure = f"{url}: no sample in the shard"
        if got or (offset and not reason):
            return
        self.failures += 1
        limit = self.owner.max_shard_failures
        if limit > 0 and self.failures >= limit:
            raise DataError(f"data {self.owner.sources[self.index].describe(self.index)}: {self.failures} shard "
                            f"reads in a row gave no sample (last: {self.last_failure}); check the shards, "
                            "or raise data.max_shard_failures")

    def _emit(self, sample: dict[str, Any], start: int | None, end: int | None, split: int = 1):
        """Advance the cursor past ``sample``; returns the item to yield, or ``None`` (another consumer's)."""
        self.offset = end
        if split > 1:
            self.seen += 1
            if (self.seen - 1) % split != self.owner.consumer:
                return None
        self.got = True
        self.yielded += 1
        return sample, (self.index, self.shard, start, self.yielded)

    def items(self, resume: bool = False) -> Iterator[tuple[dict[str, Any], tuple]]:
        """The stream from its beginning, or (``resume``) from the loaded cursor."""
        return self._resampled(resume) if self.owner.resampled else self._epochs(resume)

    def _resampled(self, resume: bool) -> Iterator[tuple[dict[str, Any], tuple]]:
        rng = _rng(self.owner.seed, 1, self.index, self.owner.consumer)
        resume = resume and self.rng is not None  # a source that had not yet been read starts afresh
        if resume:
            rng.bit_generator.state = self.rng
        while True:
            if not resume:
                self.shard, self.offset = int(rng.integers(len(self.urls))), 0
                self.rng = rng.bit_generator.state
            resume = False
            for sample, start, end in self._read(self.shard, self.offset or 0):
                yield self._emit(sample, start, end)

    def _epochs(self, resume: bool) -> Iterator[tuple[dict[str, Any], tuple]]:
        n, c = self.owner.n_consumers, self.owner.consumer
        # Fewer shards than consumers: every consumer reads every shard and keeps its share.
        split = n if len(self.urls) < n else 1
        if not resume:
            self.epoch, self.slot, self.offset, self.seen, self.got = 0, 0, 0, 0, False
        while True:
            order = _rng(self.owner.seed, 2, self.index, self.epoch).permutation(len(self.urls))
            mine = order if split > 1 else order[c::n]
            while self.slot < len(mine):
                self.shard = int(mine[self.slot])
                for sample, start, end in self._read(self.shard, self.offset or 0):
                    item = self._emit(sample, start, end, split)
                    if item is not None:
                        yield item
                self.slot, self.offset = self.slot + 1, 0
            # A source whose shards all fail is stopped by _read's count; one whose shards are read but whose
            # samples all went to other consumers (fewer samples than consumers) would loop here forever.
            if not self.got and self.epoch > 0 and self.read_this_epoch:
                raise DataError(f"data {self.owner.sources[self.index].describe(self.index)}: consumer {c} (of "
                                f"{n}) read no sample of it in a whole epoch: too few samples for "
                                "the ranks x data.workers")
            self.epoch, self.slot, self.seen, self.got = self.epoch + 1, 0, 0, False
            self.read_this_epoch = False


class _Consumer:
    """The raw-sample stream of one consumer (no decoding), and its saved position.

    ``open(start)`` returns the stream positioned after ``start``: a plain int (an older position) replays
    that many raw samples; a position from :meth:`position` reopens each source's shard at its saved byte
    offset and refills the shuffle buffer by reading its members at theirs. Sources whose shards cannot
    seek replay their own stream up to the saved count instead.
    """

    def __init__(self, sources: list[Source], *, seed: int, consumer: int, n_consumers: int,
                 resampled: bool, shuffle_buffer: int, max_shard_failures: int = 50) -> None:
        self.sources = sources
        self.max_shard_failures = max_shard_failures
        self.seed = seed
        self.consumer = consumer
        self.n_consumers = n_consumers
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.skipped: Counter[str] = Counter()
        self.examples: list[tuple[str, str]] = []
        self.raw = 0  # raw samples emitted
        self.streams = [_SourceStream(self, i) for i in range(len(sources))]
        self.pick = _rng(seed, 3, consumer)
        self.shuffle = random.Random(hash((seed, 4, consumer)))
        self.buffer: list[dict[str, Any]] = []
        self.refs: list[tuple] = []  # where each buffer member was read (see _SourceStream)

    def _note(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < EXAMPLES_PER_BATCH and sum(r == reason for r, _ in self.examples) < 2:
            self.examples.append((reason, message))

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "consumer": self.consumer, "consumers": self.n_consumers,
                "resampled": self.resampled, "shards": [len(s.urls) for s in self.sources]}

    def position(self) -> dict[str, Any]:
        """Where this consumer stands, as JSON-able values (see :meth:`open`)."""
        return {"version": _POSITION_VERSION, "raw": self.raw, **self._identity(),
                "pick": self.pick.bit_generator.state, "shuffle": _pack_mt(self.shuffle.getstate()),
                "sources": [s.state() for s in self.streams], "buffer": [list(r) for r in self.refs]}

    def open(self, start: int | dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        if not start:
            return self._run([s.items() for s in self.streams])
        if isinstance(start, int):
            raw = self._run([s.items() for s in self.streams])
            for _ in range(start):  # an older position: replay without decoding
                next(raw)
            return raw
        return self._run(self._restore(start))

    def _check(self, start: dict[str, Any]) -> None:
        if start.get("version") != _POSITION_VERSION:
            raise ValueError(f"data position has version {start.get('version')!r}; this vlp reads "
                             f"version {_POSITION_VERSION}")
        saved = {k: start.get(k) for k in self._identity()}
        mine = self._identity()
        for key in mine:
            if saved[key] != mine[key]:
                raise ValueError(f"data position was saved with {key}={saved[key]!r}; this run has "
                                 f"{key}={mine[key]!r}: exact resume needs the same data, seed, world size "
                                 "and data.workers")
        full = self.shuffle_buffer if self.shuffle_buffer > 1 else 0
        if len(start["buffer"]) != full:
            raise ValueError(f"data position holds a shuffle buffer of {len(start['buffer'])} samples; this "
                             f"run has data.shuffle_buffer={self.shuffle_buffer}: exact resume needs the same")

    def _restore(self, start: dict[str, Any]) -> list[Iterator[tuple[dict[str, Any], tuple]]]:
        self._check(start)
        self.raw = int(start["raw"])
        self.pick.bit_generator.state = start["pick"]
        self.shuffle.setstate(_unpack_mt(start["shuffle"]))
        refs = [tuple(r) for r in start["buffer"]]
        buffer: list[dict[str, Any] | None] = [None] * len(refs)
        items = []
        for stream, state in zip(self.streams, start["sources"]):
            wanted = {r[3]: k for k, r in enumerate(refs) if r[0] == stream.index}
            if state["offset"] is not None and all(refs[k][2] is not None for k in wanted.values()):
                stream.load(state)  # seek: the shard at its offset, the buffer members at theirs
                for k in wanted.values():
                    buffer[k] = read_sample_at(stream.urls[refs[k][1]], refs[k][2])
                items.append(stream.items(resume=True))
                continue
            it = stream.items()  # cannot seek: read forward to the saved count, keeping the buffer members
            while stream.yielded < state["yielded"]:
                sample, ref = next(it)
                if ref[3] in wanted:
                    buffer[wanted[ref[3]]] = sample
            items.append(it)
        self.buffer, self.refs = buffer, refs  # type: ignore[assignment]
        return items

    def _run(self, items: list[Iterator[tuple[dict[str, Any], tuple]]]) -> Iterator[dict[str, Any]]:
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        weights /= weights.sum()
        while True:
            src = int(self.pick.choice(len(items), p=weights)) if len(items) > 1 else 0
            sample, ref = next(items[src])
            if self.shuffle_buffer > 1:
                if len(self.buffer) < self.shuffle_buffer:
                    self.buffer.append(sample)
                    self.refs.append(ref)
                    continue
                k = self.shuffle.randrange(len(self.buffer))
                self.buffer[k], sample = sample, self.buffer[k]
                self.refs[k] = ref
            self.raw += 1
            yield sample


class WdsPipeline(IterableDataset):
    """Infinite stream of collated micro-batches ``(batch, BatchMeta)`` for one rank."""

    def __init__(self, sources: list[Source], adapter: SampleAdapter, *, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, resampled: bool = False, shuffle_buffer: int = 1000,
                 start: dict[int, int] | None = None, worker_offset: int = 0, seed_samples: bool = False,
                 max_consecutive_skips: int = 1000, max_image_pixels: int | None = None,
                 max_shard_failures: int = 50):
        super().__init__()
        self.sources = sources
        self.adapter = adapter
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.start = dict(start or {})
        self.worker_offset = worker_offset
        self.seed_samples = seed_samples
        self.max_consecutive_skips = max_consecutive_skips
        self.max_image_pixels = max_image_pixels  # data.max_image_pixels; None: leave the process's setting
        self.max_shard_failures = max_shard_failures

    def __iter__(self) -> Iterator[tuple[dict[str, Any], BatchMeta]]:
        if self.max_image_pixels is not None:  # in the process that decodes: a worker, or this one
            set_max_image_pixels(self.max_image_pixels)
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.worker_offset) % n_workers
        consumer = _Consumer(self.sources, seed=self.seed, consumer=self.rank * n_workers + worker,
                             n_consumers=self.world_size * n_workers, resampled=self.resampled,
                             shuffle_buffer=self.shuffle_buffer, max_shard_failures=self.max_shard_failures)
        raw = consumer.open(self.start.get(worker))
        position = consumer.raw
        reported: Counter[str] = Counter(consumer.skipped)  # skips while reopening were already counted
        consumer.examples.clear()
        samples: list[dict[str, Any]] = []
        run_of_skips = 0
        while True:
            sample = next(raw)
            position += 1
            if self.seed_samples:
                sample["__seed__"] = hash((self.seed, consumer.consumer, position)) & 0x7FFFFFFF
            try:
                samples.append(self.adapter(sample))
                run_of_skips = 0
            except SkipSample as e:
                consumer._note(e.reason, f"{sample.get('__url__')}:{sample.get('__key__')}: {e.detail or e.reason}")
                run_of_skips += 1
                if run_of_skips >= self.max_consecutive_skips:
                    # An adapter that rejects everything (wrong caption key, wrong image member) would
                    # otherwise loop over the data forever without yielding a batch.
                    raise DataError(
                        f"{run_of_skips} samples in a row were skipped (last: {sample.get('__url__')}:"
                        f"{sample.get('__key__')}: {e}); skip counts {dict(consumer.skipped)}: "
                        "does the data carry the members the method reads?"
                    ) from None
            if len(samples) == self.batch_size:
                delta = consumer.skipped - reported
                reported = Counter(consumer.skipped)
                meta = BatchMeta(worker=worker, raw=consumer.position(), skipped=dict(delta),
                                 examples=consumer.examples, samples=position)
                consumer.examples = []
                yield self.adapter.collate(samples), meta
                samples = []


def _worker_init(_: int) -> None:
    # Decoding threads would oversubscribe the cores the workers already use.
    torch.set_num_threads(1)


def build_train_loader(pipeline: WdsPipeline, *, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=False,
        multiprocessing_context="fork" if workers > 0 and os.name == "posix" else None,
    )
