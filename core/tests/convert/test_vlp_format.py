"""vlp's checkpoint file: metadata, lossless round trip, atomic writes, the trainer's step_<n>.pt (trusted path
only), and the strict key/shape check before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from vlp_core.config import to_dict
from vlp_core.convert import ConversionError, Converted, load_converters, load_vlp_checkpoint, read_source
from vlp_core.convert.archs import openai_clip_config
from vlp_core.convert.build import build_train_step, run_config_from_dict
from vlp_core.convert.registry import READERS, detect_reader
from vlp_core.convert.vlp_format import atomic_write, save_vlp_checkpoint
from vlp_core.train.checkpoint import CheckpointManager, rng_state

load_converters()


def _tiny() -> Converted:
    cfg = openai_clip_config(vision_width=64, vision_layers=1, patch=8, image_size=16, text_width=64,
                             text_layers=1, text_heads=2, embed_dim=32, context_length=16, act="quick_gelu")
    torch.manual_seed(0)
    step = build_train_step(cfg)
    return Converted(state_dict=dict(step.state_dict()), config=cfg, layout="open_clip")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_write_and_read_back(tmp_path: Path) -> None:
    conv = _tiny()
    out = tmp_path / "tiny.safetensors"
    save_vlp_checkpoint(conv, out)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.safetensors"]  # no .tmp left behind
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "vlp" and meta["version"] == "1" and meta["layout"] == "open_clip"
    assert meta["step"] == "0"
    assert yaml.safe_load(meta["config"]) == to_dict(conv.config)
    state_dict, config, step = load_vlp_checkpoint(out)
    _assert_same(state_dict, conv.state_dict)
    assert config == to_dict(conv.config) and step == 0
    # The registered reader gives the same config back as a RunConfig (the method's loss dataclass included).
    source = read_source(out)
    assert detect_reader(source).name == "vlp"
    again = READERS["vlp"].read(source, None)
    assert to_dict(again.config) == to_dict(conv.config)
    assert type(again.config.loss) is type(conv.config.loss)
    _assert_same(again.state_dict, conv.state_dict)
    model = build_train_step(run_config_from_dict(config))
    model.load_state_dict(state_dict, strict=True)


def test_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    conv = _tiny()
    sd = dict(conv.state_dict)
    del sd["model.text.ln_final.bias"]
    sd["model.text_proj.weight"] = torch.zeros(3, 3)
    sd["model.extra"] = torch.zeros(1)
    out = tmp_path / "bad.safetensors"
    with pytest.raises(ConversionError, match=r"missing keys: model\.text\.ln_final\.bias.*unexpected keys: "
                                              r"model\.extra.*shape mismatch: model\.text_proj\.weight"):
        save_vlp_checkpoint(Converted(sd, conv.config, "open_clip"), out)
    assert not out.exists()
    with pytest.raises(ConversionError, match=r"\.safetensors files"):
        save_vlp_checkpoint(conv, tmp_path / "x.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "f.bin"
    out.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(out, broken)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_trainer_checkpoint_is_read_weights_only(tmp_path: Path) -> None:
    conv = _tiny()
    run = tmp_path / "run"
    # What the trainer saves (RNG states included) is weights-only: read by the one safe loader.
    saved = {"step": 7, "model": conv.state_dict, "config": to_dict(conv.config), "optimizer": {},
             "ranks": [{"rng": rng_state()}]}
    path = CheckpointManager(run / "checkpoints").save(saved, 7)
    _assert_same(read_source(path).state_dict, conv.state_dict)
    for where in (path, run):
        state_dict, config, step = load_vlp_checkpoint(where)
        _assert_same(state_dict, conv.state_dict)
        assert config == to_dict(conv.config) and step == 7
    # A trainer-named file holding anything else (here a raw numpy array) is refused, naming it.
    saved["ranks"] = [{"rng": {"numpy": np.random.get_state()}}]
    bad = CheckpointManager(tmp_path / "other" / "checkpoints").save(saved, 8)
    with pytest.raises(ConversionError, match=rf"{bad}.* is a pickle that is not weights-only"):
        load_vlp_checkpoint(bad)


def test_foreign_file_is_not_a_vlp_checkpoint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match="not a vlp checkpoint; convert it first: vlp-convert"):
        load_vlp_checkpoint(tmp_path / "w.safetensors")


def test_clip_bpe_ids_without_files() -> None:
    """The converters build CLIP models with OpenAI's BPE ids without reading the vocabulary file."""
    from vlp_core.convert.build import model_tokenizer
    from vlp_core.data.tokenizer import Tokenizer

    ids = model_tokenizer(openai_clip_config())
    real = Tokenizer.from_pretrained("clip-bpe", context_length=77)
    assert (ids.vocab_size, ids.pad_id, ids.bos_id, ids.eot_id) == (real.vocab_size, real.pad_id, real.bos_id,
                                                                     real.eot_id)
