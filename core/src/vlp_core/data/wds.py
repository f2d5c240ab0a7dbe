"""Deterministic, exactly resumable webdataset training pipeline.

Each (rank, worker) pair is one *consumer*. A consumer reads a raw sample stream that depends only on the
seed, its consumer index and the number of consumers:

1. every source (a shard list with a weight) yields raw samples forever: in *epoch* mode the shards are
   permuted per epoch with ``seed + epoch`` (the same permutation on every consumer) and split across
   consumers (by shard when there are enough shards, else by sample); in *resampled* mode shards are drawn
   with replacement from a consumer-seeded generator;
2. a consumer-seeded generator picks the source of each sample by weight;
3. a seeded shuffle buffer reorders the raw samples.

The position of a consumer is one integer: the number of raw samples its shuffle buffer has emitted. On
resume each consumer replays its raw stream up to that count without decoding anything, so the batches
after resume are exactly those an uninterrupted run would have seen. Decoding happens after the buffer;
samples the method's adapter rejects (undecodable image, empty caption) and shards that break off are
skipped and counted, and the counts travel with the batches to the trainer.

Batches from the workers are consumed round-robin by the ``DataLoader``; after ``n`` batches the next one
comes from worker ``n % W``, so on resume the workers are relabelled by that offset (``logical id``).
"""

from __future__ import annotations

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

from vlp_core.data.tario import CorruptShard, expand_urls, iter_samples
from vlp_core.method import SampleAdapter, SkipSample

__all__ = ["Source", "parse_sources", "WdsPipeline", "build_train_loader", "BatchMeta"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0


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
        sources.append(Source(urls=tuple(urls), weight=weight))
    return sources


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in keys])


@dataclass
class BatchMeta:
    worker: int  # logical worker id
    raw: int  # raw samples this consumer has emitted from its shuffle buffer so far
    skipped: dict[str, int]  # skip counts since the previous batch of this worker
    examples: list[str]  # a few skip messages (file and key) for the log


class _Consumer:
    """The raw-sample stream of one consumer (no decoding)."""

    def __init__(self, sources: list[Source], *, seed: int, consumer: int, n_consumers: int,
                 resampled: bool, shuffle_buffer: int) -> None:
        self.sources = sources
        self.seed = seed
        self.consumer = consumer
        self.n_consumers = n_consumers
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.skipped: Counter[str] = Counter()
        self.examples: list[str] = []

    def _note(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def _shard_samples(self, url: str) -> Iterator[dict[str, Any]]:
        try:
            yield from iter_samples(url)
        except CorruptShard as e:
            self._note("corrupt_shard", str(e))
        except FileNotFoundError as e:
            self._note("missing_shard", str(e))

    def _source_stream(self, index: int) -> Iterator[dict[str, Any]]:
        urls = list(self.sources[index].urls)
        n, c = self.n_consumers, self.consumer
        if self.resampled:
            rng = _rng(self.seed, 1, index, c)
            while True:
                yield from self._shard_samples(urls[rng.integers(len(urls))])
        epoch = 0
        while True:
            order = _rng(self.seed, 2, index, epoch).permutation(len(urls))
            got = False
            if len(urls) >= n:
                for j in order[c::n]:
                    for sample in self._shard_samples(urls[j]):
                        got = True
                        yield sample
            else:
                # Fewer shards than consumers: every consumer reads every shard and keeps its share.
                seen = 0
                for j in order:
                    for sample in self._shard_samples(urls[j]):
                        seen += 1
                        if (seen - 1) % n == c:
                            got = True
                            yield sample
            if not got and epoch > 0:
                raise RuntimeError(f"consumer {c} read no sample from source {index} in a whole epoch")
            epoch += 1

    def raw_stream(self) -> Iterator[dict[str, Any]]:
        streams = [self._source_stream(i) for i in range(len(self.sources))]
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        weights /= weights.sum()
        pick = _rng(self.seed, 3, self.consumer)
        shuffle = random.Random(hash((self.seed, 4, self.consumer)))
        buffer: list[dict[str, Any]] = []
        while True:
            src = int(pick.choice(len(streams), p=weights)) if len(streams) > 1 else 0
            sample = next(streams[src])
            if self.shuffle_buffer <= 1:
                yield sample
                continue
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            k = shuffle.randrange(len(buffer))
            buffer[k], sample = sample, buffer[k]
            yield sample


class WdsPipeline(IterableDataset):
    """Infinite stream of collated micro-batches ``(batch, BatchMeta)`` for one rank."""

    def __init__(self, sources: list[Source], adapter: SampleAdapter, *, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, resampled: bool = False, shuffle_buffer: int = 1000,
                 start: dict[int, int] | None = None, worker_offset: int = 0, seed_samples: bool = False,
                 max_consecutive_skips: int = 1000):
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

    def __iter__(self) -> Iterator[tuple[dict[str, Any], BatchMeta]]:
        info = get_worker_info()
        n_workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.worker_offset) % n_workers
        consumer = _Consumer(self.sources, seed=self.seed, consumer=self.rank * n_workers + worker,
                             n_consumers=self.world_size * n_workers, resampled=self.resampled,
                             shuffle_buffer=self.shuffle_buffer)
        raw = consumer.raw_stream()
        position = self.start.get(worker, 0)
        for _ in range(position):  # replay without decoding: exact resume
            next(raw)
        reported: Counter[str] = Counter(consumer.skipped)  # skips during replay were already counted
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
                consumer._note(e.reason, f"{sample.get('__url__')}:{sample.get('__key__')}: {e}")
                run_of_skips += 1
                if run_of_skips >= self.max_consecutive_skips:
                    # An adapter that rejects everything (wrong caption key, wrong image member) would
                    # otherwise loop over the data forever without yielding a batch.
                    raise ValueError(
                        f"{run_of_skips} samples in a row were skipped (last: {sample.get('__url__')}:"
                        f"{sample.get('__key__')}: {e}); skip counts {dict(consumer.skipped)}: "
                        "does the data carry the members the method reads?"
                    ) from None
            if len(samples) == self.batch_size:
                delta = consumer.skipped - reported
                reported = Counter(consumer.skipped)
                meta = BatchMeta(worker=worker, raw=position, skipped=dict(delta), examples=consumer.examples)
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
