"""Table -> shards conversion and the vlp-data CLI's error handling."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp_core.data.cli import main as cli_main
from vlp_core.data.convert import convert_table
from vlp_core.data.tario import iter_samples


def _image(path: Path, fmt: str, color: tuple[int, ...], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (10, 8), color).save(buf, fmt)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture()
def table(tmp_path: Path) -> Path:
    img = tmp_path / "imgs"
    img.mkdir()
    jpg = _image(img / "a.jpg", "JPEG", (200, 10, 10))
    _image(img / "b.png", "PNG", (10, 10, 200, 0), mode="RGBA")  # fully transparent: composited on white
    (img / "bad.jpg").write_bytes(b"not an image at all")
    (img / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    rows = [
        ("imgs/a.jpg", "a red box", "x1"), ("imgs/b.png", "a white box", "x2"),
        ("imgs/gone.jpg", "gone", "x3"), ("imgs/bad.jpg", "bad", "x4"), ("imgs/trunc.jpg", "cut", "x5"),
        ("imgs/a.jpg", "  ", "x6"), (str(img / "a.jpg"), "absolute path", "x7"),
    ]
    path = tmp_path / "table.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption", "extra"])
        w.writerows(rows)
    return path


def test_convert_csv(table: Path, tmp_path: Path) -> None:
    stats = convert_table(table, tmp_path / "out", shard_size=2, progress=False)
    assert stats.written == 3
    assert dict(stats.skipped) == {"missing image file": 1, "undecodable image": 2, "empty caption": 1}
    assert any("gone.jpg" in e for e in stats.examples["missing image file"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["00000.tar", "00001.tar"]
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 1}
    samples = [s for u in sorted((tmp_path / "out").glob("*.tar")) for s in iter_samples(str(u))]
    assert [s["txt"].decode() for s in samples] == ["a red box", "a white box", "absolute path"]
    assert samples[0]["jpg"] == (table.parent / "imgs" / "a.jpg").read_bytes()  # JPEG kept byte for byte
    png = Image.open(io.BytesIO(samples[1]["jpg"]))
    assert png.format == "JPEG" and png.size == (10, 8)
    assert np.abs(np.asarray(png, dtype=int) - 255).max() < 8  # transparent -> white, not black
    meta = json.loads(samples[1]["json"])
    assert meta["extra"] == "x2" and meta["image"] == "imgs/b.png" and meta["key"] == samples[1]["__key__"]
    assert len({s["__key__"] for s in samples}) == 3


def test_convert_jsonl_base_dir_and_columns(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    _image(tmp_path / "pics" / "c.webp", "WEBP", (0, 255, 0))
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"file": "c.webp", "text": "green", "score": 0.5}) + "\n\n")
    stats = convert_table(
        table, tmp_path / "o", image_col="file", caption_col="text", base_dir=tmp_path / "pics",
        progress=False,
    )
    assert stats.written == 1 and not stats.skipped
    (sample,) = iter_samples(str(tmp_path / "o" / "00000.tar"))
    assert json.loads(sample["json"])["score"] == 0.5
    assert np.asarray(Image.open(io.BytesIO(sample["jpg"])))[..., 1].min() > 240


def test_cli_convert_and_errors(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["convert", str(table), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote 3 samples" in out and "skipped 4 row(s)" in out and "gone.jpg" in out
    assert cli_main(["info", str(tmp_path / "out")]) == 0
    assert "3 samples" in capsys.readouterr().out
    assert cli_main(["convert", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing.csv" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli_main(["convert", str(table), "--out", str(tmp_path / "y"), "--caption-col", "alt"]) == 2
    assert "'alt'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # nothing written on a user error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a", "caption": "b"}\n{oops\n')
    assert cli_main(["convert", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture) -> None:
    for argv, needle in [
        (["--help"], "synth"), (["convert", "--help"], "--caption-col"), (["synth", "--help"], "--noise"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0 and needle in capsys.readouterr().out
