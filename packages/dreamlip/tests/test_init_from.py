"""``dreamlip-train --init-from`` a converted OpenCLIP checkpoint: DreamLIP's dual encoder starts from it,
trains 2 steps and evaluates."""

import pytest
from vlp_dreamlip.cli import train_main

from vlp_core.testing.pretrained import openclip_checkpoint, train_from_checkpoint

pytest.importorskip("open_clip")


def test_init_from_openclip_then_train_and_evaluate(tiny_world, tmp_path, capsys) -> None:
    converted = openclip_checkpoint(tmp_path / "openclip")
    assert train_from_checkpoint(train_main, converted, tiny_world, tmp_path / "run", towers="visual,text") == 0
    out = capsys.readouterr()
    assert "zeroshot_color/top1" in out.out
    assert "initialised from" in out.err and "loaded model.visual" in out.err


def test_export_to_open_clip_and_hugging_face(tmp_path) -> None:
    """`vlp-convert <dreamlip checkpoint> --to open_clip / --to hf`: the dual encoder exports as CLIP (its loss
    state stays behind) and gives the same embeddings in OpenCLIP and transformers."""
    from vlp_dreamlip import METHOD

    from vlp_core.testing.pretrained import check_exports

    check_exports(METHOD, tmp_path)
