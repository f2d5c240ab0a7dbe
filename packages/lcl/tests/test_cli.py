"""End to end: lcl-train on pairs + documents, lcl-eval on the run, the core's linear probe on its ViT."""

from __future__ import annotations

import json

import pytest
from vlp_lcl.cli import eval_main, train_main

from vlp_core.eval.linear_probe import main as probe_main


def test_help_prints_usage(capsys) -> None:
    for entry in (train_main, eval_main):
        with pytest.raises(SystemExit):
            entry(["--help"])
        assert "usage" in capsys.readouterr().out


def test_bad_override_is_a_clear_error(capsys) -> None:
    assert train_main(["--preset", "smoke", "--set", "loss.img_first_prob=2", "--print-config"]) == 2
    assert "loss.img_first_prob" in capsys.readouterr().err


@pytest.mark.slow
def test_train_eval_probe(tiny_world, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    data = f"{tiny_world}/train/{{00000..00001}}.tar::{tiny_world}/docs/00000.tar"
    common = ["--set", f"data.world_dir={tiny_world}", "--set", "data.world_train_samples=200"]
    assert train_main(["--preset", "smoke", "--output-dir", str(run), "--train-data", data,
                       "--set", "data.train_weights=1::1", "--set", "train.progress=false", *common]) == 0
    results = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= results["zeroshot_shape/top1"] <= 100.0 and "retrieval/i2t_R@1" in results
    capsys.readouterr()
    assert eval_main([str(run), "--set", "eval.retrieval=", "--set", "eval.compositional="]) == 0
    assert "zeroshot_color/top1" in json.loads(capsys.readouterr().out)
    out = tmp_path / "probe.json"
    assert probe_main([str(run), "--method", "lcl", "--sets", "zeroshot_color", "--output", str(out)]) == 0
    probe = json.loads(out.read_text())
    assert probe["zeroshot_color/probe_n_test"] == 11 and 0 <= probe["zeroshot_color/probe_top1"] <= 100
