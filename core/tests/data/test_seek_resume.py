"""Resume that seeks: a saved data position reopens local shards at byte offsets instead of replaying them.

The acceptance checks: on local tar shards a resumed consumer reads at most its shuffle buffer plus one sample
(and the samples of its first batch) before that batch, however far the run had gone, and the batches after
resume are bit-identical to an uninterrupted pipeline's; streams that cannot seek (``pipe:``, compressed
tars) and older integer positions resume exactly by reading forward.
"""

import gzip
import itertools
import json
import shutil

import pytest
import torch

from vlp_core.data.tario import READS, ShardWriter, iter_positioned, iter_samples, read_sample_at
from vlp_core.data.wds import WdsPipeline, build_train_loader, parse_sources, position_samples
from vlp_core.method import SkipSample

MEMBERS = 2  # tar members per sample: txt and bin
PAD = 1100  # payload tensors are zero-padded to this length


class PayloadAdapter:
    """Samples carry an integer caption and a payload of varying length; every 11th sample is rejected."""

    def __call__(self, sample):
        x = int(sample["txt"])
        if x % 11 == 5:
            raise SkipSample("bad_image", "rejected")
        payload = torch.zeros(PAD, dtype=torch.uint8)
        payload[: len(sample["bin"])] = torch.frombuffer(bytearray(sample["bin"]), dtype=torch.uint8)
        return {"x": x, "payload": payload, "key": sample["__key__"], "seed": sample["__seed__"]}

    def collate(self, samples):
        return {"x": torch.tensor([s["x"] for s in samples]), "payload": torch.stack([s["payload"] for s in samples]),
                "key": [s["key"] for s in samples], "seed": [s["seed"] for s in samples]}


def write_shards(folder, n_shards, per_shard, *, start=0):
    with ShardWriter(str(folder / "%05d.tar"), max_count=per_shard) as w:
        for i in range(start, start + n_shards * per_shard):
            payload = bytes((i * 7 + j) % 256 for j in range(40 + (i * 37) % 1000))  # 1 or 2 tar blocks
            w.write({"__key__": f"s{i:06d}", "txt": str(i), "bin": payload})
    return f"{folder}/{{00000..{n_shards - 1:05d}}}.tar"


def make(data, weights="", **kw):
    args = dict(batch_size=4, seed=3, shuffle_buffer=8, seed_samples=True)
    args.update(kw)
    return WdsPipeline(parse_sources(data, weights), PayloadAdapter(), **args)


def assert_same(a, b):
    assert a["key"] == b["key"]
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["payload"], b["payload"])
    assert a["seed"] == b["seed"]  # per-sample seeds (augmentation, caption choice) survive resume too


def roundtrip(position):
    return json.loads(json.dumps(position))  # a position is JSON-able


def sources_for(mode, tmp_path):
    """(train_data, weights, pipeline kwargs) for a sampling mode; 3 consumers read them."""
    if mode == "split":  # fewer shards than consumers: every consumer reads the shard and keeps its share
        return write_shards(tmp_path, 1, 90), "", {}
    a = write_shards(tmp_path / "a", 6, 20)
    if mode == "weighted":
        return f"{a}::{write_shards(tmp_path / 'b', 3, 20, start=1000)}", "1::2", {}
    return a, "", {"resampled": mode == "resampled"}


@pytest.mark.parametrize("mode", ["epoch", "resampled", "weighted", "split"])
@pytest.mark.parametrize("consumed", [18, 23])
def test_resume_reads_the_buffer_not_the_history(tmp_path, mode, consumed):
    data, weights, kw = sources_for(mode, tmp_path)
    world = 3
    split = world if mode == "split" else 1
    for rank in range(world):
        full = list(itertools.islice(iter(make(data, weights, rank=rank, world_size=world, **kw)), consumed + 3))
        position = roundtrip(full[consumed - 1][1].raw)
        assert position["raw"] == full[consumed - 1][1].samples >= consumed * 4  # past two epochs of 40

        READS.clear()
        resumed = iter(make(data, weights, rank=rank, world_size=world, start={0: position}, **kw))
        first, meta = next(resumed)
        emitted = meta.samples - position["raw"]  # samples the first batch itself needed (skips included)
        assert READS["members"] <= MEMBERS * (8 + split * (emitted + 1))  # buffer + one, not the history
        for (a, _), (b, _) in zip(full[consumed:], [(first, meta), *itertools.islice(resumed, 2)]):
            assert_same(a, b)

        READS.clear()  # an older position (a plain count) replays the history and lands on the same batches
        replayed = iter(make(data, weights, rank=rank, world_size=world, start={0: position_samples(position)},
                             **kw))
        again, _ = next(replayed)
        assert READS["members"] >= MEMBERS * position["raw"]
        assert_same(again, first)


@pytest.mark.parametrize("consumed", [5, 8])
def test_resume_with_workers_is_bit_identical(tmp_path, consumed):
    data = write_shards(tmp_path, 8, 15)
    workers = 2
    for rank in range(2):
        full = list(itertools.islice(iter(build_train_loader(make(data, rank=rank, world_size=2), workers=workers)),
                                     consumed + 6))
        state = {}
        for _, meta in full[:consumed]:
            state[meta.worker] = meta.raw
        state = {int(k): v for k, v in roundtrip(state).items()}  # as a checkpoint stores it
        pipe = make(data, rank=rank, world_size=2, start=state, worker_offset=consumed % workers)
        resumed = list(itertools.islice(iter(build_train_loader(pipe, workers=workers)), 6))
        for (a, _), (b, _) in zip(full[consumed:], resumed):
            assert_same(a, b)


def test_source_not_yet_read_at_the_checkpoint_resumes(tmp_path):
    data = f"{write_shards(tmp_path / 'a', 4, 20)}::{write_shards(tmp_path / 'b', 4, 20, start=1000)}"
    for resampled in (False, True):
        kw = dict(resampled=resampled, shuffle_buffer=0, batch_size=1)
        full = list(itertools.islice(iter(make(data, "1::0.2", **kw)), 40))
        first_b = next(i for i, (batch, _) in enumerate(full) if batch["x"][0] >= 1000)
        assert first_b >= 1
        position = roundtrip(full[first_b - 1][1].raw)  # just before source b is first drawn
        assert position["sources"][1]["yielded"] == 0
        resumed = list(itertools.islice(iter(make(data, "1::0.2", start={0: position}, **kw)), 5))
        for (x, _), (y, _) in zip(full[first_b:], resumed):
            assert_same(x, y)


def gzip_shards(folder, pattern_folder, n):
    for i in range(n):
        with open(pattern_folder / f"{i:05d}.tar", "rb") as src, gzip.open(folder / f"{i:05d}.tar.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return f"{folder}/{{00000..{n - 1:05d}}}.tar.gz"


@pytest.mark.parametrize("kind", ["pipe", "gzip", "mixed"])
def test_streams_that_cannot_seek_resume_by_reading_forward(tmp_path, kind):
    local = write_shards(tmp_path / "t", 4, 20)
    if kind == "gzip":
        (tmp_path / "g").mkdir()
        data, weights = gzip_shards(tmp_path / "g", tmp_path / "t", 4), ""
    else:
        data, weights = f"pipe:cat {local}", ""
        if kind == "mixed":  # a local source seeks while the pipe source reads forward
            data, weights = f"{write_shards(tmp_path / 'm', 4, 20, start=1000)}::{data}", "1::1"
    consumed = 12
    full = list(itertools.islice(iter(make(data, weights)), consumed + 3))
    position = roundtrip(full[consumed - 1][1].raw)
    moving = position["sources"][-1]
    assert moving["offset"] is None  # no byte offsets for these streams
    assert all(ref[2] is None for ref in position["buffer"] if ref[0] == len(position["sources"]) - 1)
    READS.clear()
    resumed = list(itertools.islice(iter(make(data, weights, start={0: position})), 3))
    assert READS["members"] >= MEMBERS * moving["yielded"]  # read forward to where it stopped
    for (a, _), (b, _) in zip(full[consumed:], resumed):
        assert_same(a, b)


def test_positioned_reads_match_the_stream(tmp_path):
    with ShardWriter(str(tmp_path / "%05d.tar"), max_count=10) as w:
        for i in range(6):  # names over 100 characters take a pax header before the member's own
            w.write({"__key__": f"{'long' * 30 if i % 2 else 'k'}{i}", "txt": str(i), "bin": bytes(100 * i)})
    url = str(tmp_path / "00000.tar")
    items = list(iter_positioned(url))
    assert [s for s, _, _ in items] == list(iter_samples(url))
    for k, (sample, start, end) in enumerate(items):
        assert read_sample_at(url, start) == sample
        assert [s for s, _, _ in iter_positioned(url, end)] == [s for s, _, _ in items[k + 1:]]
    assert list(iter_positioned(url, (tmp_path / "00000.tar").stat().st_size)) == []
    with open(url, "rb") as src, gzip.open(tmp_path / "c.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    packed = list(iter_positioned(str(tmp_path / "c.tar.gz")))
    assert [s["txt"] for s, _, _ in packed] == [s["txt"] for s, _, _ in items]
    assert {(a, b) for _, a, b in packed} == {(None, None)}
    with pytest.raises(ValueError, match="only a local shard"):
        next(iter_positioned(f"pipe:cat {url}", 512))


def test_position_that_does_not_fit_is_a_clear_error(tmp_path):
    data = write_shards(tmp_path, 6, 20)
    _, meta = next(itertools.islice(iter(make(data, world_size=2)), 5, None))
    position = roundtrip(meta.raw)
    with pytest.raises(ValueError, match="saved with consumers=2; this run has consumers=3"):
        next(iter(make(data, world_size=3, start={0: position})))
    with pytest.raises(ValueError, match="shuffle buffer of 8 samples.*data.shuffle_buffer=16"):
        next(iter(make(data, world_size=2, shuffle_buffer=16, start={0: position})))
    src, shard, offset, _ = position["buffer"][0]
    url = parse_sources(data)[src].urls[shard]
    with open(url, "r+b") as f:  # the shard was replaced by a shorter one since the checkpoint
        f.truncate(offset)
    with pytest.raises(ValueError, match=rf"cannot read the sample at byte {offset} of shard .*{url[-9:]}"):
        next(iter(make(data, world_size=2, start={0: position})))
