"""``llip-train`` and ``llip-eval`` end to end on a tiny shapes world (in-process: no interpreter start-ups)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vlp_llip.cli import eval_main, train_main


def smoke(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", "train.progress=false", *extra]


def results(stdout: str) -> dict[str, float]:
    return json.loads(stdout[stdout.index("{"):])


@pytest.mark.parametrize("main", [train_main, eval_main])
def test_help_prints_usage(main, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_train_then_eval_report_zero_shot_and_retrieval(tiny_world: Path, tmp_path: Path, capsys) -> None:
    assert train_main(smoke(tiny_world, tmp_path / "run")) == 0
    got = results(capsys.readouterr().out)
    for key in ("zeroshot_shape/top1", "zeroshot_color_shape/top1", "retrieval/i2t_R@1", "retrieval/t2i_R@5",
                "retrieval_multi/i2t_R@1", "retrieval_multi/t2i_R@5", "compositional/accuracy"):
        assert 0.0 <= got[key] <= 100.0, key
    assert got["retrieval/n_images"] == 50
    assert eval_main([str(tmp_path / "run")]) == 0
    assert results(capsys.readouterr().out) == got  # the checkpoint reproduces the end-of-training evaluation


def test_register_variant_trains_with_the_embedding_scorer(tiny_world: Path, tmp_path: Path, capsys) -> None:
    argv = smoke(tiny_world, tmp_path / "reg", "--set", "loss.variant=register", "--set",
                 "eval.zeroshot=zeroshot_shape", "--set", "eval.compositional=")
    assert train_main(argv) == 0
    assert "retrieval/i2t_R@1" in results(capsys.readouterr().out)


@pytest.mark.parametrize("setting, key", [("model.vision.extra_tokens=0", "model.vision.extra_tokens"),
                                          ("loss.variant=regster", "loss.variant")])
def test_bad_settings_give_a_clear_error(setting: str, key: str, tiny_world: Path, tmp_path: Path, capsys) -> None:
    assert train_main(smoke(tiny_world, tmp_path / "bad", "--set", setting)) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_eval_takes_a_released_checkpoint_raw_or_converted(tiny_world: Path, tmp_path: Path, capsys) -> None:
    """``llip-eval`` on an official-layout checkpoint (converted on the fly) and on its ``vlp-convert`` output."""
    from test_convert import official, save_like_official

    from vlp_core.convert.cli import main as convert_main

    raw = save_like_official(official("official_rules"), tmp_path / "llip_tiny.pt")
    assert convert_main([str(raw), str(tmp_path / "llip_tiny.safetensors")]) == 0
    capsys.readouterr()
    argv = ["--eval-data", str(tiny_world), "--set", "eval.zeroshot=zeroshot_shape", "--set", "eval.compositional="]
    assert eval_main([str(raw), *argv]) == 0
    got = results(capsys.readouterr().out)
    assert eval_main([str(tmp_path / "llip_tiny.safetensors"), *argv]) == 0
    assert results(capsys.readouterr().out) == got
    assert got["retrieval/n_images"] == 50 and 0.0 <= got["zeroshot_shape/top1"] <= 100.0
