"""``vlp-convert``: layouts detected and logged, --help/--list, trainer checkpoints, and bad input.

Every bad input is a ``ValueError`` naming what is wrong from the Python API, and from the command line
exit code 2 with exactly one line on stderr, no traceback and no output file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlp_core.config import to_dict
from vlp_core.convert import READERS, Converted, detect_reader, load_converters, load_vlp_checkpoint, read_source
from vlp_core.convert.archs import openai_clip_config
from vlp_core.convert.build import build_train_step
from vlp_core.convert.cli import main
from vlp_core.convert.openai_clip import to_open_clip
from vlp_core.train.checkpoint import CheckpointManager, rng_state

load_converters()


def _tiny_cfg():  # type: ignore[no-untyped-def]
    return openai_clip_config(vision_width=64, vision_layers=2, patch=8, image_size=16, text_width=64,
                              text_layers=2, text_heads=1, embed_dim=32, context_length=16, act="quick_gelu")


def _tiny_converted() -> Converted:
    torch.manual_seed(0)
    return Converted(dict(build_train_step(_tiny_cfg()).state_dict()), _tiny_cfg(), "openai")


def _openai_sd() -> dict[str, torch.Tensor]:
    """A small checkpoint in OpenAI's layout (what clip.load(jit=False).state_dict() holds)."""
    sd = to_open_clip(_tiny_converted())
    sd.update(input_resolution=torch.tensor(16), context_length=torch.tensor(16), vocab_size=torch.tensor(49408))
    return sd


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_converts_and_logs_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "openai.safetensors", tmp_path / "vlp.safetensors"
    save_file(_openai_sd(), str(src))
    code, stdout, stderr = _run(capsys, str(src), str(out))
    assert (code, stderr) == (0, "")
    assert "detected layout 'openai'" in stdout and "wrote" in stdout
    state_dict, config, step = load_vlp_checkpoint(out)
    assert step == 0 and config["model"]["vision"]["heads"] == 1 and config["model"]["text"]["heads"] == 1
    expected = _tiny_converted().state_dict
    assert sorted(state_dict) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(state_dict[k], expected[k], rtol=0, atol=0)


def test_help_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for name in READERS:
        assert f"  {name} " in text
    assert "examples:" in text and "--arch ViT-B-32" in text and "--to open_clip" in text
    code, stdout, _ = _run(capsys, "--list")
    assert code == 0 and "open_clip" in stdout and "ViT-bigG-14" in stdout


def test_trainer_checkpoint_and_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conv = _tiny_converted()
    saved = {"step": 3, "model": conv.state_dict, "config": to_dict(conv.config),
             "ranks": [{"rng": rng_state()}]}
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints").save(saved, 3)
    out = tmp_path / "from_run.safetensors"
    code, stdout, stderr = _run(capsys, str(ckpt), str(out))
    assert (code, stderr) == (0, "") and "weights-only" in stdout
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["step"] == "3"
    # vlp -> open_clip: the OpenAI keys of the same weights.
    back = tmp_path / "back.safetensors"
    assert _run(capsys, str(out), str(back), "--to", "open_clip")[0] == 0
    src = read_source(back)
    want = to_open_clip(conv)
    assert sorted(src.state_dict) == sorted(want)
    for k in want:
        torch.testing.assert_close(src.state_dict[k], want[k], rtol=0, atol=0)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("never",))


def _bad_input(tmp_path: Path, case: str) -> tuple[Path, list[str], str]:
    """(source, extra CLI args, message fragment) for one kind of bad input."""
    path = tmp_path / "src.safetensors"
    sd = _openai_sd()
    args: list[str] = []
    if case == "resnet":
        import timm

        resnet = timm.create_model("resnet10t", pretrained=False)
        save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(path))
        return path, args, "unknown checkpoint layout"
    if case == "missing":
        del sd["visual.transformer.resblocks.1.ln_2.bias"]
        fragment = "openai checkpoint: missing keys: visual.transformer.resblocks.1.ln_2.bias"
    elif case == "unexpected":
        sd["visual.extra_token"] = torch.zeros(3)
        fragment = "openai checkpoint: unexpected keys: visual.extra_token"
    elif case == "shape":
        sd["transformer.resblocks.1.attn.out_proj.weight"] = torch.zeros(64, 32)
        fragment = "shape mismatch: transformer.resblocks.1.attn.out_proj.weight (64, 32) (expected (64, 64))"
    elif case == "rn50":
        sd = {k: v for k, v in sd.items() if k != "input_resolution"}
        sd["visual.layer1.0.conv1.weight"] = torch.zeros(4, 4, 1, 1)
        fragment = "ResNet image tower"
    elif case == "no_arch":
        sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        fragment = "open_clip checkpoint: a state dict does not tell GELU from QuickGELU: pass --arch"
    elif case == "bad_arch":
        args = ["--arch", "ViT-L-14-quickgelu"]
        fragment = "does not match --arch ViT-L-14-quickgelu: image width 64 (ViT-L-14-quickgelu has 1024)"
    elif case == "text":
        path = tmp_path / "notes.pt"
        path.write_text("hello\n")
        return path, args, "is not a checkpoint"
    elif case == "pickle":
        path = tmp_path / "evil.pt"
        torch.save({"w": torch.zeros(1), "x": _Evil()}, path)
        return path, args, "not weights-only"
    elif case == "to":
        args = ["--to", "onnx"]
        fragment = "unknown output format --to 'onnx'"
    save_file(sd, str(path))
    return path, args, fragment


CASES = ["resnet", "missing", "unexpected", "shape", "rn50", "no_arch", "bad_arch", "text", "pickle", "to"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    src, args, fragment = _bad_input(tmp_path, case)
    out = tmp_path / "out" / "converted.safetensors"
    code, _, stderr = _run(capsys, str(src), str(out), *args)
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("vlp-convert: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.parametrize("case", [c for c in CASES if c != "to"])
def test_bad_input_api(tmp_path: Path, case: str) -> None:
    src, args, fragment = _bad_input(tmp_path, case)
    arch = args[1] if args else None
    with pytest.raises(ValueError) as info:
        source = read_source(src)
        detect_reader(source).read(source, arch)
    assert fragment in str(info.value) and "\n" not in str(info.value)
