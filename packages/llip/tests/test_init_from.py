"""``llip-train --init-from`` a converted OpenCLIP checkpoint: Llip's text tower starts from it (its image tower
holds K mixture tokens instead of a class token, so ``train.init_towers=text``), trains 2 steps and evaluates."""

import pytest
from vlp_llip.cli import train_main

from vlp_core.testing.pretrained import openclip_checkpoint, train_from_checkpoint

pytest.importorskip("open_clip")


def test_init_from_openclip_then_train_and_evaluate(tiny_world, tmp_path, capsys) -> None:
    converted = openclip_checkpoint(tmp_path / "openclip")
    assert train_from_checkpoint(train_main, converted, tiny_world, tmp_path / "run", towers="text") == 0
    out = capsys.readouterr()
    assert "zeroshot_color/top1" in out.out
    assert "loaded model.text" in out.err and "left at initialisation: model.visual" in out.err


def test_whole_model_init_names_the_mixture_tokens(tiny_world, tmp_path, capsys) -> None:
    converted = openclip_checkpoint(tmp_path / "openclip")
    assert train_from_checkpoint(train_main, converted, tiny_world, tmp_path / "run", "model.vision.pool=none",
                                 "model.vision.class_token=false") == 2
    assert "cannot start model.visual" in capsys.readouterr().err
