"""End to end on a tiny shapes world: the CLIs, training with the grouping maps, evaluation and prepare."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from vlp_dreamlip import METHOD
from vlp_dreamlip.cli import eval_main, train_main
from vlp_dreamlip.config import RELEASE_CAPTION_KEYS
from vlp_dreamlip.data import DreamLipAdapter
from vlp_dreamlip.prepare import RELEASE_COLUMNS
from vlp_dreamlip.prepare import main as prepare_main
from vlp_dreamlip.visualize import grouping_maps, visualize

from vlp_core.data.tario import iter_samples


def _args(world, out, *extra):
    return ["--preset", "smoke", "--output-dir", str(out), "--set", f"data.world_dir={world}",
            "--set", "train.progress=false", "--set", "data.workers=0", *extra]


def test_train_writes_grouping_maps_and_evaluates_long_retrieval(tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert train_main(_args(tiny_world, out, "--set", "train.image_grid_every=2")) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "dreamlip/grouping_maps" in acc.Tags()["images"]
    assert [e.step for e in acc.Images("dreamlip/grouping_maps")] == [0, 2]
    assert {"train/loss_mpcl", "train/loss_sgl", "train/logit_scale_local"} <= set(acc.Tags()["scalars"])
    # dreamlip-eval on the checkpoint, with the long-caption retrieval set.
    res_file = tmp_path / "res.json"
    assert eval_main([str(out), "--output", str(res_file), "--set", "eval.retrieval=retrieval,retrieval_long"]) == 0
    results = json.loads(res_file.read_text())
    assert any(k.startswith("retrieval_long/") for k in results)
    assert any(k.startswith("compositional") for k in results) and any("zeroshot" in k for k in results)


def test_visualize_maps_are_the_loss_weights(tiny_world):
    from vlp_core.data.tokenizer import Tokenizer
    from vlp_core.train.loop import _to_device

    cfg = METHOD.preset("smoke")
    tok = Tokenizer.from_pretrained(str(tiny_world / "tokenizer.json"), context_length=16)
    ad = DreamLipAdapter(tok, image_size=32, num_subcaptions=3)
    samples = [dict(s, __seed__=i) for i, s in zip(range(3), iter_samples(str(tiny_world / "train/00000.tar")))]
    batch = _to_device(ad.collate([ad(s) for s in samples]), torch.device("cpu"))
    model = METHOD.build_model(cfg, tok).eval()
    loss = METHOD.build_loss(cfg)
    with torch.no_grad():
        maps = grouping_maps(model, batch["images"], batch["tokens"])
        assert maps.shape == (3, 4, 4, 4)
        assert torch.allclose(maps.sum((-1, -2)), torch.ones(3, 4))
        img = visualize(model, loss, batch)["dreamlip/grouping_maps"]
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[1] == 5 * 96  # the image, then one map per text


def test_cli_help_and_presets(capsys):
    for main in (train_main, eval_main, prepare_main):  # the nox build session runs the installed scripts
        with pytest.raises(SystemExit) as exit_info:
            main(["--help"])
        assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out
    assert train_main(["--preset", "cc3m", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "num_subcaptions: 8" in printed and "batch_size: 1024" in printed
    assert "context_length: 77" in printed and RELEASE_CAPTION_KEYS in printed
    assert train_main(["--set", "loss.sgl_sigma=2", "--print-config"]) == 2
    assert "loss.sgl_sigma" in capsys.readouterr().err
    for name in ("demo", "demo_mpcl", "demo_clip_raw"):
        cfg = METHOD.preset(name)  # equal budget: same towers, steps and batch
        assert (cfg.model, cfg.train.steps, cfg.train.batch_size) == (
            METHOD.preset("demo").model, 300, 128)


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), color, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(rows[0])
        w.writerows(rows[1:])


def test_prepare_converts_the_release_csv(tmp_path, capsys):
    images = tmp_path / "images" / "0000000"
    images.mkdir(parents=True)
    (images / "0000001.jpg").write_bytes(_png((200, 10, 10)))  # a PNG under a .jpg name: re-encoded
    (images / "0000002.png").write_bytes(_png((10, 200, 10)))
    long_sv = "A red square fills the frame. It is bright.\nThe background is plain."
    rows = [list(RELEASE_COLUMNS),
            ["0000000/0000001.jpg", "red thing", "a red square", "A red square. It is big.", "red square",
             long_sv, "square", "A square."],
            ["0000000/0000002.png", "green", "", "", "green square", "Green. Square.", "", ""],
            ["0000000/missing.jpg", "gone", "", "", "", "", "", ""]]
    _write_csv(tmp_path / "caps.csv", rows)
    out = tmp_path / "shards"
    assert prepare_main([str(tmp_path / "caps.csv"), "--images", str(tmp_path / "images"), "--out", str(out),
                         "--no-progress"]) == 0
    assert "wrote 2 samples" in capsys.readouterr().out
    samples = list(iter_samples(str(out / "00000.tar")))
    assert [s["txt"].decode() for s in samples] == ["red thing", "green"]
    meta = json.loads(samples[0]["json"])
    assert meta["longSV_captions"] == long_sv and meta["raw_caption"] == "red thing"
    # The adapter reads the release keys: pool in the official order, empty columns contribute nothing.
    ad = DreamLipAdapter(lambda t: torch.zeros(len(t), 4, dtype=torch.long), image_size=16,
                         caption_keys=RELEASE_CAPTION_KEYS, num_subcaptions=2)
    assert ad.pool(samples[0]) == ["a red square", "A red square.", "It is big.", "red square",
                                   "A red square fills the frame.", "It is bright.", "The background is plain.",
                                   "square", "A square."]
    assert ad.pool(samples[1]) == ["green square", "Green.", "Square."]
    with tarfile.open(out / "00000.tar") as tar:
        assert Image.open(tar.extractfile(tar.getmembers()[0])).format == "JPEG"


def test_prepare_errors_name_the_problem(tmp_path, capsys):
    _write_csv(tmp_path / "bad.csv", [["Image Path", "raw_caption"], ["a.jpg", "x"]])
    assert prepare_main([str(tmp_path / "bad.csv"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "shortIB_captions" in capsys.readouterr().err
    _write_csv(tmp_path / "urls.csv", [list(RELEASE_COLUMNS), ["https://x.org/a.jpg"] + ["c"] * 7])
    assert prepare_main([str(tmp_path / "urls.csv"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "img2dataset" in capsys.readouterr().err
    assert prepare_main([str(tmp_path / "nope.csv"), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("negatives", ["image", "global"])
def test_one_training_step_runs_both_sgl_forms(tiny_world, tmp_path, negatives):
    assert train_main(_args(tiny_world, tmp_path / negatives, "--steps", "2", "--set", "eval.at_end=false",
                            "--set", f"loss.sgl_negatives={negatives}")) == 0
    last = json.loads((tmp_path / negatives / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["train/loss"]) and last["train/loss_sgl"] > 0
