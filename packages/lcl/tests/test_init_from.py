"""``lcl-train --init-from`` a converted OpenCLIP checkpoint: LCL's ViT starts from it (its text side is a
language model, not a CLIP text tower), trains 2 steps and evaluates."""

import pytest
from vlp_lcl.cli import train_main

from vlp_core.testing.pretrained import openclip_checkpoint, train_from_checkpoint

pytest.importorskip("open_clip")


def test_init_from_openclip_then_train_and_evaluate(tiny_world, tmp_path, capsys) -> None:
    converted = openclip_checkpoint(tmp_path / "openclip")
    data = f"{tiny_world}/train/{{00000..00001}}.tar::{tiny_world}/docs/00000.tar"
    assert train_from_checkpoint(train_main, converted, tiny_world, tmp_path / "run", f"data.train_data={data}",
                                 "data.train_weights=1::1", towers="visual") == 0
    out = capsys.readouterr()
    assert "zeroshot_color/top1" in out.out
    assert "initialised from" in out.err and "loaded model.visual" in out.err
