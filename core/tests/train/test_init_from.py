"""``--init-from``: towers from a converted OpenCLIP checkpoint, then 2 training steps and evaluation."""

from __future__ import annotations

import pytest
import torch

from vlp_core.clip import METHOD
from vlp_core.clip.cli import eval_main, train_main
from vlp_core.config import apply_overrides
from vlp_core.convert.vlp_format import load_vlp_checkpoint
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.testing.pretrained import TinyClip, openclip_checkpoint, train_from_checkpoint
from vlp_core.train.init_from import init_from
from vlp_core.train.loop import TrainStep

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return openclip_checkpoint(tmp_path_factory.mktemp("openclip"))


def _step_module(*overrides: str) -> tuple[TrainStep, object]:
    cfg = apply_overrides(METHOD.preset("smoke"), [*TinyClip().overrides(), *overrides])
    tok = Tokenizer.from_pretrained("clip-bpe", context_length=cfg.model.text.context_length)
    return TrainStep(METHOD.build_model(cfg, tok), METHOD.build_loss(cfg)), cfg


def test_towers_equal_the_checkpoint(converted) -> None:
    step_module, cfg = _step_module()
    parts = init_from(step_module, str(converted), cfg)
    assert parts["loaded"] == ["model.visual", "model.text", "model.image_proj", "model.text_proj", "loss"]
    saved, _, _ = load_vlp_checkpoint(converted)
    own = step_module.state_dict()
    assert set(own) == set(saved)
    for key, value in saved.items():
        assert torch.equal(own[key], value), key


def test_mismatched_tower_is_refused_by_name(converted) -> None:
    step_module, cfg = _step_module("model.vision.width=128", "model.vision.heads=2")
    with pytest.raises(ValueError, match=r"model\.visual.*shape mismatch.*visual\.trunk"):
        init_from(step_module, str(converted), cfg)
    step_module, cfg = _step_module("model.text.act=quick_gelu")
    with pytest.raises(ValueError, match=r"model\.text\.act=gelu"):
        init_from(step_module, str(converted), cfg)


def test_init_from_then_train_two_steps_and_evaluate(converted, tiny_world, tmp_path, capsys) -> None:
    assert train_from_checkpoint(train_main, converted, tiny_world, tmp_path / "run") == 0
    assert "zeroshot_color/top1" in capsys.readouterr().out
    # The converted file itself evaluates with clip-eval once an evaluation set is named.
    assert eval_main([str(converted), "--eval-data", str(tiny_world), "--set", "eval.zeroshot=zeroshot_color",
                      "--set", "eval.retrieval=", "--set", "eval.compositional="]) == 0
    assert "zeroshot_color/top1" in capsys.readouterr().out
    # ... and refuses to guess one.
    assert eval_main([str(converted)]) == 2
    assert "brings no evaluation sets" in capsys.readouterr().err
