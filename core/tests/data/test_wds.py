"""The training pipeline: determinism, exact resume, splits, weights and skip counting."""

import itertools
import os
from collections import Counter

import pytest
import torch

from vlp_core.data.tario import ShardWriter, iter_samples
from vlp_core.data.wds import WdsPipeline, build_train_loader, parse_sources
from vlp_core.method import SkipSample


class IntAdapter:
    """Samples carry an integer in ``txt``; 'bad' captions are skipped like undecodable images."""

    def __call__(self, sample):
        text = sample["txt"].decode()
        if text == "bad":
            raise SkipSample("bad_image", "not an integer")
        return {"x": int(text), "seed": sample.get("__seed__", -1)}

    def collate(self, samples):
        return {"x": torch.tensor([s["x"] for s in samples]), "seed": [s["seed"] for s in samples]}


def write_shards(folder, n_shards, per_shard, *, start=0, bad_every=0):
    pattern = str(folder / "%05d.tar")
    with ShardWriter(pattern, max_count=per_shard) as w:
        for i in range(start, start + n_shards * per_shard):
            text = "bad" if bad_every and i % bad_every == 0 else str(i)
            w.write({"__key__": f"s{i:06d}", "txt": text})
    return f"{folder}/{{00000..{n_shards - 1:05d}}}.tar"


def take(pipeline, workers, n):
    loader = build_train_loader(pipeline, workers=workers)
    return list(itertools.islice(iter(loader), n))


@pytest.fixture
def shards(tmp_path):
    return write_shards(tmp_path, n_shards=6, per_shard=20)


def make(shards, **kw):
    args = dict(batch_size=4, seed=1, shuffle_buffer=8)
    args.update(kw)
    return WdsPipeline(parse_sources(shards), IntAdapter(), **args)


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_same_batches(shards, workers):
    a = take(make(shards), workers, 12)
    b = take(make(shards), workers, 12)
    assert all(torch.equal(x[0]["x"], y[0]["x"]) for x, y in zip(a, b))
    c = take(make(shards, seed=2), workers, 12)
    assert not all(torch.equal(x[0]["x"], y[0]["x"]) for x, y in zip(a, c))


@pytest.mark.parametrize("workers, consumed", [(0, 5), (2, 5), (2, 8), (3, 7)])
def test_resume_continues_exactly(shards, workers, consumed):
    full = take(make(shards), workers, consumed + 10)
    state = {}
    for _, meta in full[:consumed]:
        state[meta.worker] = meta.raw
    resumed = take(make(shards, start=state, worker_offset=consumed % max(workers, 1)), workers, 10)
    for (a, _), (b, _) in zip(full[consumed:], resumed):
        assert torch.equal(a["x"], b["x"])
        assert a["seed"] == b["seed"]  # per-sample seeds (augmentation, caption choice) survive resume too


def test_epoch_mode_splits_every_sample_once_across_ranks_and_workers(tmp_path):
    shards = write_shards(tmp_path, n_shards=8, per_shard=10)
    seen = []
    for rank in range(2):
        p = make(shards, rank=rank, world_size=2, shuffle_buffer=0, batch_size=5)
        # each of 2 workers gets 2 shards = 20 samples = 4 batches per worker in epoch 0
        for batch, _ in take(p, 2, 8):
            seen.extend(batch["x"].tolist())
    assert sorted(seen) == list(range(80))


def test_fewer_shards_than_consumers_splits_by_sample(tmp_path):
    shards = write_shards(tmp_path, n_shards=1, per_shard=24)
    seen = []
    for rank in range(2):
        for batch, _ in take(make(shards, rank=rank, world_size=2, shuffle_buffer=0, batch_size=3), 2, 4):
            seen.extend(batch["x"].tolist())
    assert sorted(seen) == list(range(24))


def test_source_weights(tmp_path):
    a = write_shards(tmp_path / "a", n_shards=2, per_shard=50, start=0)
    b = write_shards(tmp_path / "b", n_shards=2, per_shard=50, start=1000)
    p = WdsPipeline(parse_sources(f"{a}::{b}", "1::3"), IntAdapter(), batch_size=50, seed=0,
                    resampled=True, shuffle_buffer=0)
    xs = torch.cat([batch["x"] for batch, _ in take(p, 0, 40)])
    frac_b = (xs >= 1000).float().mean().item()
    assert abs(frac_b - 0.75) < 0.03


def test_skips_are_counted_and_truncated_shard_is_not_fatal(tmp_path):
    shards = write_shards(tmp_path, n_shards=3, per_shard=10, bad_every=7)
    # cut the last shard inside its sixth member (each member: a 512-byte header and one 512-byte block)
    last = tmp_path / "00002.tar"
    last.write_bytes(last.read_bytes()[: 5 * 1024 + 600])
    complete = sum(1 for _ in _safe(str(last)))
    p = make(shards, shuffle_buffer=0, batch_size=1)
    got = take(p, 0, 40)  # a bit more than one epoch
    skipped = Counter()
    for _, meta in got:
        skipped.update(meta.skipped)
    assert skipped["corrupt_shard"] >= 1
    assert skipped["bad_image"] >= 3  # samples 0, 7, 14 in the first epoch
    assert 0 < complete < 10
    expected = {i for i in list(range(20)) + list(range(20, 20 + complete)) if i % 7}
    first_epoch = {b["x"].item() for b, _ in got[: len(expected)]}
    assert first_epoch == expected


def _safe(url):
    try:
        yield from iter_samples(url)
    except Exception:
        return


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"shard not found: .*00003\.tar"):
        parse_sources(f"{tmp_path}/{{00003..00004}}.tar")
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        write_shards(tmp_path, 1, 2)
        parse_sources(f"{tmp_path}/00000.tar", "1::2")
    assert os.path.exists(tmp_path / "00000.tar")


def test_adapter_rejecting_everything_is_a_clear_error_not_a_hang(tmp_path):
    shards = write_shards(tmp_path, n_shards=1, per_shard=10, bad_every=1)
    p = make(shards, shuffle_buffer=0, max_consecutive_skips=25)
    with pytest.raises(ValueError, match="25 samples in a row were skipped.*bad_image"):
        take(p, 0, 1)


def test_seeded_augment_repeats_per_sample_and_leaves_global_rng_alone():
    import random

    from vlp_core.data.adapters import seeded_augment

    def draw(seed):
        with seeded_augment(random.Random(seed), True):
            return torch.rand(4)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator was not advanced
    rng = random.Random(7)
    state = rng.getstate()
    with seeded_augment(rng, False):
        pass
    assert rng.getstate() == state  # disabled: no draw from the sample's generator
