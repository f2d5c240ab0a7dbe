"""The safe loader: every accepted format reads back the saved tensors; everything else is a one-line error
naming the file, and a pickle that could run code is never executed."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vlp_core.convert import ConversionError, read_source
from vlp_core.models import load_pretrained
from vlp_core.models.pretrained import read_state_dict


def _sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g),
            "b": torch.arange(5)}


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt"])
def test_torch_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"w{suffix}"
    torch.save(_sd(), path)
    src = read_source(path)
    _same(src.state_dict, _sd())
    assert src.meta["format"] == "torch" and src.files == ()


def test_legacy_pickle_format(tmp_path: Path) -> None:
    torch.save(_sd(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    _same(read_source(tmp_path / "old.pt").state_dict, _sd())


def test_safetensors_keeps_metadata(tmp_path: Path) -> None:
    save_file(_sd(), str(tmp_path / "w.safetensors"), metadata={"format": "pt", "note": "hi"})
    src = read_source(tmp_path / "w.safetensors")
    _same(src.state_dict, _sd())
    assert src.meta["safetensors_metadata"] == {"format": "pt", "note": "hi"}


def test_wrappers_and_prefixes(tmp_path: Path) -> None:
    wrapped = {f"module._orig_mod.{k}": v for k, v in _sd().items()}
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "a.pt")
    torch.save({"model": {f"_orig_mod.module.{k}": v for k, v in _sd().items()}}, tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        _same(read_source(tmp_path / name).state_dict, _sd())


def test_folders(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(_sd(), str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"model_type": "clip"}))
    src = read_source(hf)
    _same(src.state_dict, _sd())
    assert src.meta["config"] == {"model_type": "clip"}
    assert src.files == ("config.json", "model.safetensors")
    oc = tmp_path / "oc"
    oc.mkdir()
    torch.save(_sd(), oc / "open_clip_pytorch_model.bin")
    _same(read_source(oc).state_dict, _sd())
    # A sharded checkpoint: the index maps each key to its shard.
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    sd = _sd()
    save_file({"a.weight": sd["a.weight"]}, str(sharded / "model-00001-of-00002.safetensors"))
    save_file({"a.bias": sd["a.bias"], "b": sd["b"]}, str(sharded / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "a.bias": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    got = read_source(sharded).state_dict
    _same({k: got[k] for k in sd}, sd)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    torch.jit.script(lin).save(str(tmp_path / "jit.pt"))
    src = read_source(tmp_path / "jit.pt")
    assert src.meta["jit"] is True
    _same(src.state_dict, {k: v.detach() for k, v in lin.state_dict().items()})


class _Evil:
    """Unpickling this would create a marker file (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_refuses_code_running_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, path)
    for read in (read_source, lambda p: read_state_dict(str(p)), lambda p: load_pretrained(nn.Linear(1, 1), str(p))):
        with pytest.raises(ConversionError) as info:
            read(path)
        message = str(info.value)
        assert "\n" not in message
        assert str(path) in message and "not weights-only" in message and "system" in message
        assert "was not loaded" in message
    assert not marker.exists()


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    text = tmp_path / "notes.pt"
    text.write_text("just some text\n")
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)).tolist()))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    zipped = tmp_path / "docs.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("readme.txt", "hello")
    fake_st = tmp_path / "fake.safetensors"
    fake_st.write_text("not a safetensors header")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"\x00" * 16)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    mixed = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "name": "x"}, mixed)
    return {
        "text": (text, "is not a checkpoint"),
        "noise": (noise, "is not a checkpoint"),
        "empty": (empty, "is empty"),
        "zip": (zipped, "zip archive but not a PyTorch checkpoint"),
        "safetensors": (fake_st, "not a valid safetensors file"),
        "suffix": (other, "unsupported weight file"),
        "list": (listed, "does not hold a state dict of tensors (got list)"),
        "mixed": (mixed, "name is not a tensor"),
        "missing": (tmp_path / "absent.safetensors", "not found"),
        "folder": (tmp_path, "holds none of"),
    }


@pytest.mark.parametrize("case", ["text", "noise", "empty", "zip", "safetensors", "suffix", "list", "mixed",
                                  "missing", "folder"])
def test_non_checkpoints(tmp_path: Path, case: str) -> None:
    path, fragment = _bad_files(tmp_path)[case]
    with pytest.raises(ValueError) as info:
        read_source(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message
