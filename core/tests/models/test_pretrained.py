"""Pretrained loading: file formats, wrappers and prefixes, error messages, and the towers' ``pretrained``.

Round trips are checked against the invariant "a module loaded from another's weights computes the same
outputs".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vlp_core.config import TextConfig, VisionConfig
from vlp_core.models import CausalTextTransformer, build_text_tower, build_vision_tower, load_pretrained

V = 30


def _text(seed: int) -> CausalTextTransformer:
    torch.manual_seed(seed)
    return CausalTextTransformer(vocab_size=V, context_length=8, width=16, depth=1, heads=2)


def _tokens() -> torch.Tensor:
    return torch.tensor([[1, 5, 7, 2, 0, 0, 0, 0], [3, 4, 5, 6, 7, 2, 0, 0]])


def _assert_same_text(a: CausalTextTransformer, b: CausalTextTransformer) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(_tokens()).tokens, b(_tokens()).tokens)


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "bin", "folder_st", "folder_bin"])
def test_round_trip_formats(tmp_path: Path, fmt: str) -> None:
    src, dst = _text(0), _text(1)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    elif fmt in ("pt", "bin"):
        path = tmp_path / f"w.{fmt}"
        torch.save(sd, path)
    else:
        path = tmp_path / "folder"
        path.mkdir()
        if fmt == "folder_st":
            save_file(sd, str(path / "model.safetensors"))
        else:
            torch.save(sd, path / "pytorch_model.bin")
    load_pretrained(dst, str(path))
    _assert_same_text(src, dst)


def test_wrappers_and_prefixes(tmp_path: Path) -> None:
    src, dst = _text(0), _text(1)
    # A trainer checkpoint of a DDP-wrapped compiled model holding the text tower under "text.".
    wrapped = {f"module._orig_mod.text.{k}": v for k, v in src.state_dict().items()}
    wrapped["module._orig_mod.visual.w"] = torch.zeros(3)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": wrapped, "step": 3}, path)
    load_pretrained(dst, str(path), prefix="text.")
    _assert_same_text(src, dst)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "m.pth")
    load_pretrained(_text(2), str(tmp_path / "m.pth"))
    with pytest.raises(ValueError, match="prefix 'nope.'"):
        load_pretrained(dst, str(path), prefix="nope.")


def test_errors(tmp_path: Path) -> None:
    dst = _text(0)
    for missing in (str(tmp_path / "absent.safetensors"), "./absent_dir", "not/a/hub/id.pt"):
        with pytest.raises(ValueError, match="not found"):
            load_pretrained(dst, missing)
    with pytest.raises(ValueError, match="holds none of"):
        load_pretrained(dst, str(tmp_path))
    sd = dict(_text(0).state_dict())
    sd["token_embedding.weight"] = torch.zeros(V + 1, 16)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"shape mismatch.*token_embedding\.weight"):
        load_pretrained(dst, str(tmp_path / "shape.pt"))
    sd = dict(_text(0).state_dict())
    del sd["ln_final.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "keys.pt")
    with pytest.raises(ValueError, match=r"missing keys: ln_final\.weight.*unexpected keys: extra\.weight"):
        load_pretrained(dst, str(tmp_path / "keys.pt"))
    before = dst.ln_final.weight.clone()
    load_pretrained(dst, str(tmp_path / "keys.pt"), strict=False)  # loads what fits, keeps the rest
    torch.testing.assert_close(dst.ln_final.weight, before)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_pretrained(dst, str(tmp_path / "list.pt"))


def test_text_tower_pretrained_config(tmp_path: Path) -> None:
    cfg = TextConfig(width=16, heads=2, depth=1, context_length=8)
    src = build_text_tower(cfg, vocab_size=V, pad_id=0)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "t.safetensors"))
    cfg.pretrained = str(tmp_path / "t.safetensors")
    torch.manual_seed(123)
    dst = build_text_tower(cfg, vocab_size=V, pad_id=0)
    _assert_same_text(src, dst)


def test_vision_tower_pretrained_config(tmp_path: Path) -> None:
    base = dict(image_size=16, patch_size=4, width=16, depth=1, heads=2, extra_tokens=2)
    src = build_vision_tower(VisionConfig(**base))
    images = torch.randn(2, 3, 16, 16)
    # Whole-tower keys ("trunk.") and timm-layout keys both load.
    torch.save(src.state_dict(), tmp_path / "tower.pt")
    save_file(
        {k: v.contiguous() for k, v in src.trunk.state_dict().items()}, str(tmp_path / "timm.safetensors")
    )
    for name in ("tower.pt", "timm.safetensors"):
        dst = build_vision_tower(VisionConfig(**base, pretrained=str(tmp_path / name)))
        with torch.no_grad():
            torch.testing.assert_close(dst(images).patches, src(images).patches)
    # A checkpoint trained at 16 px loads at 32 px: timm's filter resamples the patch part of pos_embed and
    # keeps the prefix rows (class + extra tokens) as they are.
    big = build_vision_tower(
        VisionConfig(**{**base, "image_size": 32}, pretrained=str(tmp_path / "tower.pt"))
    )
    assert big.trunk.pos_embed.shape == (1, 3 + 64, 16)
    torch.testing.assert_close(big.trunk.pos_embed[:, :3], src.trunk.pos_embed[:, :3])
    with pytest.raises(ValueError, match="timm_name"):
        build_vision_tower(VisionConfig(**base, pretrained="timm"))


class _RunsCode:
    """Unpickling this would create ``marker`` (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_one_safe_loader(tmp_path: Path) -> None:
    """load_pretrained reads through vlp_core.convert.safe_load: unsafe pickles refused, TorchScript read."""
    marker = tmp_path / "ran"
    torch.save({"token_embedding.weight": torch.zeros(V, 16), "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt is a pickle that is not weights-only .* was not loaded"):
        load_pretrained(_text(0), str(tmp_path / "evil.pt"))
    assert not marker.exists()
    (tmp_path / "notes.bin").write_text("not weights\n")
    with pytest.raises(ValueError, match=r"notes\.bin is not a checkpoint"):
        load_pretrained(_text(0), str(tmp_path / "notes.bin"))
    torch.manual_seed(0)
    src, dst = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    torch.jit.trace(src, torch.zeros(1, 4)).save(str(tmp_path / "linear_jit.pt"))
    load_pretrained(dst, str(tmp_path / "linear_jit.pt"))
    torch.testing.assert_close(dst.weight, src.weight)
    torch.testing.assert_close(dst.bias, src.bias)
