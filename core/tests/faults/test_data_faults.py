"""Data faults: decompression bombs and oversized images, failing ``pipe:`` shards, sources whose shards all
fail, and skip messages aggregated over ranks (one line per log step on rank 0, totals in TensorBoard)."""

from __future__ import annotations

import ast
import io
import itertools
import logging
import re
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp_core.data import transforms
from vlp_core.data.adapters import ImageTextAdapter, read_image
from vlp_core.data.skips import MAX_EXAMPLES, PER_REASON, SkipLog
from vlp_core.data.tario import BadShard, ShardWriter, iter_positioned, iter_samples
from vlp_core.data.transforms import ImageDecodeError, build_transform, decode_image, set_max_image_pixels
from vlp_core.data.wds import DataError, WdsPipeline, build_train_loader, parse_sources
from vlp_core.method import SkipSample
from vlp_core.testing.dist import run_torchrun

pytestmark = pytest.mark.faults

WORKER = Path(__file__).parents[1] / "distributed" / "workers" / "train_worker.py"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` RGB pixels in its IHDR but holds a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def small_png(side: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def pixel_cap():
    """Sets the decode cap for one test and restores the process's setting (and PIL's limit) afterwards."""
    before, pil_before = transforms.max_image_pixels(), Image.MAX_IMAGE_PIXELS
    yield set_max_image_pixels
    set_max_image_pixels(before)
    Image.MAX_IMAGE_PIXELS = pil_before


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Records every ``load()`` (pixel decoding) of a PIL image file."""
    from PIL import ImageFile

    calls = []
    original = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.parametrize("cap", [0, 89_478_485, 10_000])
def test_png_bomb_header_is_skipped_before_decoding(cap, pixel_cap, no_pixel_decoding):
    bomb = png_header(20000, 20000)
    assert len(bomb) < 200  # 400 M pixels declared in a few bytes
    pixel_cap(cap)
    with pytest.raises(ImageDecodeError, match="decompression bomb|max_image_pixels") as e:
        decode_image(bomb)
    assert not isinstance(e.value, Image.DecompressionBombError)
    assert no_pixel_decoding == []  # refused from the header: no pixel buffer was allocated
    # through a training adapter: a skip with the bad_image reason, never PIL's exception
    with pytest.raises(SkipSample) as s:
        read_image({"png": bomb}, build_transform(32))
    assert s.value.reason == "bad_image"
    # between PIL's warning and error limits (10000 x 10000 = 100 M): PIL's warning is not an escape hatch
    with pytest.raises(ImageDecodeError):
        decode_image(png_header(10000, 10000))
    assert no_pixel_decoding == []


def test_image_over_the_configured_cap_is_skipped_and_one_under_it_decodes(pixel_cap, no_pixel_decoding):
    data = small_png(16)  # 256 pixels
    pixel_cap(255)
    with pytest.raises(ImageDecodeError, match=r"16 x 16 = 256 pixels is over data.max_image_pixels=255"):
        decode_image(data)
    assert no_pixel_decoding == []
    pixel_cap(256)
    img = decode_image(data)
    assert img.size == (16, 16) and img.getpixel((3, 3)) == (200, 30, 30)
    # a cap above PIL's default limit is honoured instead of being cut short by PIL's own check
    pixel_cap(300_000_000)
    assert Image.MAX_IMAGE_PIXELS == 300_000_000
    pixel_cap(0)
    assert Image.MAX_IMAGE_PIXELS == transforms._PIL_MAX_PIXELS


class TxtAdapter:
    def __call__(self, sample):
        text = sample["txt"].decode()
        if text == "bad":
            raise SkipSample("bad_image", "not an image")
        return {"x": int(text)}

    def collate(self, samples):
        return {"x": torch.tensor([s["x"] for s in samples])}


def int_shard(folder: Path, start: int, n: int) -> str:
    with ShardWriter(str(folder / "%05d.tar"), max_count=10_000) as w:
        for i in range(start, start + n):
            w.write({"__key__": f"s{i:05d}", "txt": str(i)})
    return str(folder / "00000.tar")


def test_failing_pipe_shard_is_counted_as_bad_shard_and_the_epoch_goes_on(tmp_path):
    with pytest.raises(BadShard, match=r"pipe:false: the command exited with status 1"):
        list(iter_positioned("pipe:false"))
    good = int_shard(tmp_path / "a", 0, 10)
    calls = tmp_path / "calls"
    failing = f"pipe:echo run >> {calls}; exit 3"  # records every time it is run
    sources = parse_sources(f"{{{good},{failing}}}")
    assert len(sources) == 1 and len(sources[0].urls) == 2
    pipe = WdsPipeline(sources, TxtAdapter(), batch_size=1, seed=0, shuffle_buffer=0)
    got = list(itertools.islice(iter(pipe), 35))  # 3.5 epochs of the good shard
    xs = [b["x"].item() for b, _ in got]
    assert sorted(xs[:10]) == list(range(10)) and sorted(xs[10:20]) == list(range(10))  # every sample each epoch
    skipped = Counter()
    for _, meta in got:
        skipped.update(meta.skipped)
    runs = len(calls.read_text().splitlines())
    assert runs >= 3 and skipped == {"bad_shard": runs}  # each failed run counted once, nothing else
    examples = [m for _, meta in got for r, m in meta.examples if r == "bad_shard"]
    assert examples and "exited with status 3" in examples[0]


@pytest.mark.parametrize("resampled", [True, False])
def test_source_whose_shards_all_fail_stops_naming_it(tmp_path, resampled):
    good = int_shard(tmp_path / "a", 0, 50)
    broken = "{pipe:false,pipe:exit 3}"
    pipe = WdsPipeline(parse_sources(f"{good}::{broken}"), TxtAdapter(), batch_size=4, seed=0, shuffle_buffer=0,
                       resampled=resampled, max_shard_failures=7)
    # resampled: in a loader worker, whose error must still come out as one line
    batches = iter(build_train_loader(pipe, workers=1 if resampled else 0))
    message = ""
    try:
        for _ in itertools.islice(batches, 1000):
            pass
    except DataError as e:
        message = str(e)
    for worker in getattr(batches, "_workers", []):  # after a worker's error PyTorch's shutdown waits 5 s for it
        worker.terminate()
    assert message.startswith(f"data source 1 ('{broken}'): 7 shard reads in a row gave no sample (last: "
                              "bad_shard: pipe:"), message
    assert "max_shard_failures" in message and "\n" not in message and "Traceback" not in message


def test_skip_log_limits_examples_and_learns_new_reasons(caplog):
    skips = SkipLog({"bad_image": 4})
    assert skips.order[: 3] == ["bad_image", "no_image", "empty_caption"]
    for i in range(50):
        skips.note([("bad_image", f"a:{i}"), ("method_reason", f"b:{i}"), ("bad_shard", f"c:{i}")])
    assert len(skips.examples) == MAX_EXAMPLES
    assert max(Counter(r for r, _ in skips.examples).values()) == PER_REASON
    with caplog.at_level(logging.WARNING, logger="vlp"):
        totals = skips.update(10, {"bad_image": 7, "method_reason": 2, "bad_shard": 1})
    assert totals == {"bad_image": 7, "method_reason": 2, "bad_shard": 1}
    assert "method_reason" in skips.order
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("skipped samples at step 10: 6 since the last log (bad_image 3, method_reason 2, "
                        "bad_shard 1); run total 10 (bad_image 7, method_reason 2, bad_shard 1)")
    assert len(lines) == 1 + MAX_EXAMPLES and lines[1] == "skipped sample (bad_image): a:0"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlp"):
        skips.update(20, {"bad_image": 7, "method_reason": 2, "bad_shard": 1})  # nothing new: no line
    assert caplog.records == []


# ---------------------------------------------------------------------------------------------------------
# End to end: a 2-rank clip-train run on shards with a bomb, 5% undecodable images and a failing pipe shard

STEPS, LOG_EVERY, BATCH, RANKS = 12, 4, 16, 2


def faulty_shards(world: Path, folder: Path) -> tuple[str, int]:
    """Two shards of 50 samples: one a 20000 x 20000 PNG header, five (5%) undecodable; plus ``pipe:false``."""
    good = list(iter_samples(str(world / "train" / "00000.tar")))
    good += list(iter_samples(str(world / "train" / "00001.tar")))
    undecodable = {7, 23, 41, 58, 90}
    with ShardWriter(str(folder / "%05d.tar"), max_count=50) as w:
        for i in range(100):
            sample = {"__key__": f"k{i:04d}", "txt": good[i]["txt"]}
            if i == 64:
                sample["png"] = png_header(20000, 20000)
            elif i in undecodable:
                sample["jpg"] = b"not an image at all"
            else:
                sample["jpg"] = good[i]["jpg"]
            w.write(sample)
    return f"{{{folder}/00000.tar,{folder}/00001.tar,pipe:false}}", 1 + len(undecodable)


def reference_skips(pattern: str, world: Path) -> dict[str, int]:
    """The skip counts of the batches the trainer's ranks consume, from the same pipeline run here."""
    adapter = ImageTextAdapter(lambda texts: None, image_size=32, caption_keys="txt")
    total: Counter[str] = Counter()
    for rank in range(RANKS):
        pipe = WdsPipeline(parse_sources(pattern), adapter, batch_size=BATCH // RANKS, seed=0, rank=rank,
                           world_size=RANKS, shuffle_buffer=16, seed_samples=True)
        for _, meta in itertools.islice(iter(pipe), STEPS):
            total.update(meta.skipped)
    return dict(total)


def test_two_rank_run_survives_bad_data_and_reports_it_once_per_log_step(tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pattern, bad_images = faulty_shards(tiny_world, tmp_path / "shards")
    expected = reference_skips(pattern, tiny_world)
    # 12 steps x 16 samples read both shards more than once (epoch mode): every fault is met
    assert expected["bad_image"] >= bad_images and expected["bad_shard"] >= 1
    assert set(expected) == {"bad_image", "bad_shard"}
    out = tmp_path / "run"
    r = run_torchrun(WORKER, RANKS, "--preset", "smoke", "--output-dir", str(out), "--train-data", pattern,
                     "--set", f"model.text.tokenizer={tiny_world}/tokenizer.json", "--set", "loss.caption_keys=txt",
                     "--set", "model.vision.image_size=32", "--workers", "0", "--steps", str(STEPS),
                     "--set", f"train.log_every={LOG_EVERY}", "--set", f"train.save_every={STEPS}",
                     "--set", "eval.at_end=false", "--set", "train.progress=false", timeout=240)
    log = r.stdout + r.stderr
    assert "DecompressionBomb" not in log and "Traceback" not in log

    # rank 0 alone reports: one summary line per log step with something new, and at most 5 examples
    lines = [line for line in log.splitlines() if "skipped sample" in line]
    assert lines and not any("[rank 1]" in line for line in lines)
    summaries = [i for i, line in enumerate(lines) if "skipped samples at step" in line]
    assert 1 <= len(summaries) <= STEPS // LOG_EVERY
    for a, b in zip(summaries, [*summaries[1:], len(lines) - 1]):
        assert b - a - 1 <= MAX_EXAMPLES  # examples after each summary (the final totals line excluded)
    assert len(lines) <= (1 + MAX_EXAMPLES) * (STEPS // LOG_EVERY) + 1
    # examples name the reason, the shard and the key
    assert any(re.search(r"skipped sample \(bad_image\): \S+/0000[01]\.tar:k\d{4}: ", line) for line in lines), lines

    last = lines[summaries[-1]]
    assert f"skipped samples at step {STEPS}:" in last  # the last step is a log step
    run_total = last.split("run total ", 1)[1]
    assert int(run_total.split()[0]) == sum(expected.values())
    assert dict((k, int(v)) for k, v in re.findall(r"(\w+) (\d+)", run_total.split("(", 1)[1])) == expected
    assert ast.literal_eval(lines[-1].split("skipped samples: ", 1)[1]) == expected  # the final totals line

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    for reason, n in expected.items():
        events = acc.Scalars(f"data/skipped_{reason}")
        assert events[-1].step == STEPS and events[-1].value == n
        assert [e.value for e in events] == sorted(e.value for e in events)  # running totals


def test_resume_continues_every_ranks_skip_totals(tmp_path):
    from vlp_core.distributed import DistInfo
    from vlp_core.train.loop import _restore

    def record(skipped=None):
        r = {"rng": None, "data": {"0": 5}, "batches": 3, "samples": 24}
        return r if skipped is None else {**r, "skipped": skipped}

    shared = {"step": 3, "skipped": {"bad_image": 3}}  # rank 0's own, as older checkpoints hold it
    records = [record({"bad_image": 3}), record({"bad_image": 2, "bad_shard": 1})]
    for rank in range(2):
        state = _restore(tmp_path / "step_3.pt", shared, records, DistInfo(rank, 2, rank, torch.device("cpu"), None),
                         None, 1, 8)
        assert state.skipped == records[rank]["skipped"]  # this rank's own running totals go on from here
        assert state.skips.totals == {"bad_image": 5, "bad_shard": 1}  # the run's, the same on every rank
    old = [record(), record()]
    state = _restore(tmp_path / "step_3.pt", shared, old, DistInfo(1, 2, 1, torch.device("cpu"), None), None, 1, 8)
    assert state.skipped == {} and state.skips.totals == {"bad_image": 3}
