"""Shard / ImageFolder readers on tiny sets written with ShardWriter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from vlp_eval_testutils import jpeg_bytes, retrieval_samples, write_shards, write_zeroshot

from vlp_core.eval.datasets import (
    DEFAULT_TEMPLATES,
    load_compositional_shards,
    load_imagefolder,
    load_retrieval_shards,
    load_zeroshot_shards,
)


def _collect(batches) -> list[tuple]:
    return [b for b in batches]


def test_zeroshot_shards_labels_sharding_and_skips(tmp_path: Path) -> None:
    folder = tmp_path / "zs"
    _, labels = write_zeroshot(folder, 9, ["a", "b", "c"], ["x {}."], seed=1)
    # A tenth sample that is not an image: skipped and counted, not fatal.
    write_shards(tmp_path / "extra", [{"jpg": b"not a jpeg", "cls": "0"}])
    (tmp_path / "extra" / "00000.tar").rename(folder / "99999.tar")
    batches, classnames, templates = load_zeroshot_shards(folder, image_size=8, batch_size=4)
    assert classnames == ["a", "b", "c"] and templates == ["x {}."]
    got = _collect(batches)
    assert [b[0].shape[0] for b in got] == [4, 4, 1]
    assert got[0][0].dtype == torch.uint8 and got[0][0].shape[1:] == (3, 8, 8)
    assert torch.cat([b[1] for b in got]).tolist() == labels
    assert batches.skipped == 1
    assert len(_collect(batches)) == 3 and batches.skipped == 1  # re-iterable, count per pass

    # Two ranks: disjoint shares that interleave back into the full list (the broken sample is position 9).
    shares = [load_zeroshot_shards(folder, image_size=8, rank=r, world_size=2)[0] for r in range(2)]
    per_rank = [torch.cat([b[1] for b in s]).tolist() for s in shares]
    assert per_rank[0] == labels[0::2] and per_rank[1] == labels[1::2]
    assert [s.skipped for s in shares] == [0, 1]


def test_zeroshot_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope"):
        load_zeroshot_shards(tmp_path / "nope", image_size=8)
    write_shards(tmp_path / "zs", [{"jpg": jpeg_bytes(0), "cls": "0"}])
    with pytest.raises(ValueError, match="classes.json"):
        load_zeroshot_shards(tmp_path / "zs", image_size=8)
    (tmp_path / "zs" / "classes.json").write_text(json.dumps({"classnames": ["a"]}))
    batches, _, templates = load_zeroshot_shards(tmp_path / "zs", image_size=8)
    assert templates == DEFAULT_TEMPLATES
    write_shards(tmp_path / "zs", [{"jpg": jpeg_bytes(0), "cls": "3"}])
    with pytest.raises(ValueError, match="outside"):
        _collect(batches)


def test_imagefolder(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    for label, cls in enumerate(["big_dog", "cat"]):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.jpg").write_bytes(jpeg_bytes(label * 10 + i))
    (root / "cat" / "broken.png").write_bytes(b"xx")
    (root / "cat" / "notes.txt").write_text("ignored")
    batches, classnames, templates = load_imagefolder(root, image_size=8)
    assert classnames == ["big dog", "cat"] and templates == DEFAULT_TEMPLATES
    labels = torch.cat([b[1] for b in batches]).tolist()
    assert labels == [0, 0, 0, 1, 1, 1] and batches.skipped == 1
    (root / "classes.json").write_text(json.dumps({"templates": ["art of a {}."]}))
    assert load_imagefolder(root, image_size=8)[2] == ["art of a {}."]
    with pytest.raises(ValueError, match="missing_root"):
        load_imagefolder(tmp_path / "missing_root", image_size=8)


def test_retrieval_shards_global_caption_index(tmp_path: Path) -> None:
    samples, caps = retrieval_samples(7)
    samples[4] = {**samples[4], "jpg": b"broken"}  # undecodable: its captions stay listed, image skipped
    write_shards(tmp_path / "ret", samples, max_count=3)
    want_caps = [c for cs in caps for c in cs]
    want_c2i = [i for i, cs in enumerate(caps) for _ in cs]
    for world in (1, 2, 3):
        seen_ids = []
        for rank in range(world):
            batches, captions, c2i = load_retrieval_shards(
                tmp_path / "ret", image_size=8, rank=rank, world_size=world, batch_size=2
            )
            assert captions == want_caps and c2i.tolist() == want_c2i  # identical on every rank
            ids = torch.cat([b[1] for b in batches]).tolist()
            assert all(i % world == rank for i in ids)
            seen_ids += ids
        assert sorted(seen_ids) == [0, 1, 2, 3, 5, 6]


def test_compositional_shards(tmp_path: Path) -> None:
    rows = [{"positive": f"p{i}", "negative": f"n{i}"} for i in range(5)]
    samples = [{"jpg": jpeg_bytes(i), "json": json.dumps(r)} for i, r in enumerate(rows)]
    samples.append({"jpg": jpeg_bytes(9), "json": "{not json"})
    write_shards(tmp_path / "comp", samples)
    batches = load_compositional_shards(tmp_path / "comp", image_size=8, batch_size=3)
    got = _collect(batches)
    assert sum((b[1] for b in got), []) == [f"p{i}" for i in range(5)]
    assert sum((b[2] for b in got), []) == [f"n{i}" for i in range(5)]
    assert batches.skipped == 1
