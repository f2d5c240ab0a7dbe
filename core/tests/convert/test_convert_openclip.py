"""OpenAI / OpenCLIP checkpoints in and out, checked against open_clip itself (random weights, no downloads).

- full-size ViT-B-32 state dicts (.safetensors, and .pt with a DDP ``module.`` prefix) convert to a vlp model
  whose image and text embeddings equal open_clip's (fp32, max abs diff <= 1e-5 x max abs value) and whose
  parameter count (model + loss) equals open_clip's;
- a small QuickGELU model saved in OpenAI's layouts (state dict with the input_resolution/context_length/
  vocab_size buffers, and a TorchScript archive) and as an OpenCLIP state dict all equal the reference;
- vlp -> open_clip state dict -> ``open_clip.create_model(name).load_state_dict(sd, strict=True)`` gives the
  vlp embeddings;
- the architecture table agrees with open_clip's model configs, and --arch is checked against the keys.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlp_core.convert import ConversionError, Converted, load_converters, load_vlp_checkpoint, read_source
from vlp_core.convert.archs import CLIP_ARCHS, arch_from_open_clip_config, openai_clip_config
from vlp_core.convert.build import build_loaded, run_config_from_dict
from vlp_core.convert.cli import main
from vlp_core.convert.openai_clip import read_open_clip, read_openai, to_open_clip

open_clip = pytest.importorskip("open_clip")

load_converters()
CAPTIONS = ["a photo of a red cube on a table", "two dogs"]
B32_PARAMS = 151_277_313


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in sd.items()}


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """fp32 equality up to 1e-5 of the largest magnitude."""
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5 * scale, f"max abs diff {diff} vs max abs value {scale}"


def _vlp_model(path: Path) -> nn.Module:
    state_dict, config, _ = load_vlp_checkpoint(path)
    return build_loaded(run_config_from_dict(config), state_dict).eval()


def _embed(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.model.encode_image(images), model.model.encode_text(tokens)


def _convert(src: Path, out: Path, *args: str) -> None:
    assert main([str(src), str(out), *args]) == 0
    assert out.is_file()


# ---------------------------------------------------------------------------------------------------------
# full-size ViT-B-32


@pytest.fixture(scope="module")
def b32(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32").eval()
    with torch.no_grad():
        ref.logit_scale.fill_(math.log(10.0) + torch.rand(()).item())  # not OpenCLIP's init value
    folder = tmp_path_factory.mktemp("b32")
    sd = _contiguous(ref.state_dict())
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    torch.save({f"module.{k}": v for k, v in sd.items()}, folder / "ddp.pt")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=g)
    tokens = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        image_ref, text_ref = ref.encode_image(images), ref.encode_text(tokens)
    params, scale = sum(p.numel() for p in ref.parameters()), ref.logit_scale.detach().clone()
    del ref
    converted = folder / "vlp.safetensors"
    _convert(folder / "open_clip_model.safetensors", converted, "--arch", "ViT-B-32")
    model = _vlp_model(converted)
    image_vlp, text_vlp = _embed(model, images, tokens)
    return SimpleNamespace(folder=folder, images=images, tokens=tokens, image_ref=image_ref, text_ref=text_ref,
                           params=params, scale=scale, converted=converted, image_vlp=image_vlp, text_vlp=text_vlp,
                           vlp_params=sum(p.numel() for p in model.parameters()),
                           vlp_scale=model.loss.loss.logit_scale.detach().clone())


def _check_b32(image: torch.Tensor, text: torch.Tensor, params: int, scale: torch.Tensor, b32: SimpleNamespace) -> None:
    _assert_close(image, b32.image_ref)
    _assert_close(text, b32.text_ref)
    assert b32.params == B32_PARAMS
    assert params == B32_PARAMS
    torch.testing.assert_close(scale, b32.scale.reshape(()))


def test_b32_safetensors(b32: SimpleNamespace) -> None:
    _check_b32(b32.image_vlp, b32.text_vlp, b32.vlp_params, b32.vlp_scale, b32)
    _, config, _ = load_vlp_checkpoint(b32.converted)
    v, t = config["model"]["vision"], config["model"]["text"]
    assert (v["act"], v["pre_norm"], v["norm_eps"], v["interpolation"], v["pool"]) == ("gelu", True, 1e-5, "bicubic",
                                                                                       "token")
    assert (t["tokenizer"], t["vocab_size"], t["context_length"], t["pool"]) == ("clip-bpe", 49408, 77, "eot")


def test_b32_pt_with_module_prefix(b32: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "from_pt.safetensors"
    _convert(b32.folder / "ddp.pt", out, "--arch", "ViT-B-32")
    model = _vlp_model(out)
    image, text = _embed(model, b32.images, b32.tokens)
    _check_b32(image, text, sum(p.numel() for p in model.parameters()), model.loss.loss.logit_scale.detach(), b32)


def test_b32_round_trip_to_open_clip(b32: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "open_clip.safetensors"
    _convert(b32.converted, out, "--to", "open_clip")
    fresh = open_clip.create_model("ViT-B-32").eval()
    fresh.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        _assert_close(fresh.encode_image(b32.images), b32.image_vlp)
        _assert_close(fresh.encode_text(b32.tokens), b32.text_vlp)
        torch.testing.assert_close(fresh.logit_scale.detach().reshape(()), b32.vlp_scale)


# ---------------------------------------------------------------------------------------------------------
# a small model in OpenAI's layouts


def _small(quick_gelu: bool, seed: int = 0) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = CLIP(64, CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
                 quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.9)
    return model


class _OpenAIArchive(nn.Module):
    """OpenAI's TorchScript CLIP stand-in: the OpenAI keys plus the input_resolution/... buffers."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        for name in ("visual", "transformer", "token_embedding", "ln_final", "positional_embedding",
                     "text_projection", "logit_scale"):
            setattr(self, name, getattr(clip, name))
        for name, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)


def _reference(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        return images, tokens, model.encode_image(images), model.encode_text(tokens)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("form", ["openai_state_dict", "torchscript", "open_clip"])
def test_small_quickgelu(tmp_path: Path, form: str) -> None:
    ref = _small(quick_gelu=True)
    images, tokens, image_ref, text_ref = _reference(ref)
    if form == "openai_state_dict":
        src = tmp_path / "openai.bin"
        torch.save(_contiguous(_OpenAIArchive(ref).state_dict()), src)
        args, layout = [], "openai"
    elif form == "torchscript":
        src = tmp_path / "ViT-tiny.pt"
        with torch.no_grad():
            torch.jit.trace(_OpenAIArchive(ref), (images,), check_trace=False).save(str(src))
        args, layout = [], "openai"
    else:
        src = tmp_path / "open_clip.safetensors"
        save_file(_contiguous(ref.state_dict()), str(src))
        args, layout = ["--arch", "quickgelu"], "open_clip"
    out = tmp_path / "vlp.safetensors"
    _convert(src, out, *args)
    model = _vlp_model(out)
    image, text = _embed(model, images, tokens)
    _assert_close(image, image_ref)
    _assert_close(text, text_ref)
    _, config, _ = load_vlp_checkpoint(out)
    assert config["model"]["vision"]["act"] == "quick_gelu" and config["model"]["text"]["act"] == "quick_gelu"
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["layout"] == layout


def test_activation_comes_from_arch(tmp_path: Path) -> None:
    """A GELU state dict equals the reference with --arch gelu and differs with --arch quickgelu."""
    ref = _small(quick_gelu=False)
    images, tokens, image_ref, _ = _reference(ref)
    src = tmp_path / "gelu.safetensors"
    save_file(_contiguous(ref.state_dict()), str(src))
    right, wrong = (_embed(_vlp_model_from(src, arch), images, tokens)[0] for arch in ("gelu", "quickgelu"))
    _assert_close(right, image_ref)
    assert (wrong - image_ref).abs().max() > 1e-3


def test_hub_folder_with_open_clip_config(tmp_path: Path) -> None:
    """A hub-style folder (open_clip_pytorch_model.bin + open_clip_config.json) needs no --arch."""
    ref = _small(quick_gelu=False)
    images, tokens, image_ref, text_ref = _reference(ref)
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(_contiguous(ref.state_dict()), folder / "open_clip_pytorch_model.bin")
    model_cfg = {"embed_dim": 64, "vision_cfg": {"layers": 2, "width": 128, "head_width": 64, "patch_size": 8,
                                                 "image_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    out = tmp_path / "vlp.safetensors"
    _convert(folder, out)
    image, text = _embed(_vlp_model(out), images, tokens)
    _assert_close(image, image_ref)
    _assert_close(text, text_ref)
    vision = load_vlp_checkpoint(out)[1]["model"]["vision"]
    assert (vision["act"], vision["image_mean"], vision["image_std"], vision["interpolation"]) == (
        "gelu", [0.5] * 3, [0.25] * 3, "bilinear")
    model_cfg["vision_cfg"]["no_ln_pre"] = True
    model_cfg["text_cfg"]["hf_model_name"] = "bert-base-uncased"
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    with pytest.raises(ConversionError, match=r"not supported .*: vision_cfg\.no_ln_pre=True, "
                                              r"text_cfg\.hf_model_name='bert-base-uncased'"):
        read_open_clip(read_source(folder), None)


def _vlp_model_from(src: Path, arch: str) -> nn.Module:
    converted = read_open_clip(read_source(src), arch)
    return build_loaded(converted.config, converted.state_dict).eval()


def test_small_round_trip_to_open_clip_pt(tmp_path: Path) -> None:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    ref = _small(quick_gelu=True)
    images, tokens, image_ref, text_ref = _reference(ref)
    src = tmp_path / "openai.bin"
    torch.save(_contiguous(_OpenAIArchive(ref).state_dict()), src)
    vlp_file, back = tmp_path / "vlp.safetensors", tmp_path / "back.pt"
    _convert(src, vlp_file)
    _convert(vlp_file, back, "--to", "open_clip")
    fresh = CLIP(64, CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2), quick_gelu=True)
    fresh.load_state_dict(torch.load(back, weights_only=True), strict=True)
    with torch.no_grad():
        _assert_close(fresh.eval().encode_image(images), image_ref)
        _assert_close(fresh.encode_text(tokens), text_ref)


# ---------------------------------------------------------------------------------------------------------
# architectures


@pytest.mark.parametrize("name", list(CLIP_ARCHS))
def test_arch_table_matches_open_clip(name: str) -> None:
    a = CLIP_ARCHS[name]
    cfg = open_clip.get_model_config(name)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    assert (a.embed_dim, a.vision_width, a.vision_layers, a.patch, a.image_size) == (
        cfg["embed_dim"], v["width"], v["layers"], v["patch_size"], v["image_size"])
    assert a.vision_heads == v["width"] // v.get("head_width", 64)
    assert a.vision_mlp == int(v["width"] * v.get("mlp_ratio", 4.0))
    assert (a.text_width, a.text_layers, a.text_heads, a.context_length, a.vocab_size) == (
        t["width"], t["layers"], t["heads"], t["context_length"], t["vocab_size"])
    assert a.text_mlp == int(t["width"] * t.get("mlp_ratio", 4.0))
    # ViT-L-14-336 only has OpenAI (QuickGELU) weights; open_clip's config name leaves the flag to the tag.
    assert (a.act == "quick_gelu") == (cfg.get("quick_gelu", False) or name == "ViT-L-14-336")
    from_config = arch_from_open_clip_config(cfg, name)  # what an open_clip_config.json of this model gives
    assert replace(from_config, act=a.act) == a


def test_default_config_is_b32() -> None:
    cfg = openai_clip_config()
    v, t = cfg.model.vision, cfg.model.text
    a = CLIP_ARCHS["ViT-B-32"]
    assert (v.width, v.depth, v.heads, v.patch_size, v.image_size, v.act) == (
        a.vision_width, a.vision_layers, a.vision_heads, a.patch, a.image_size, a.act)
    assert (t.width, t.depth, t.heads, t.context_length, t.vocab_size, cfg.model.embed_dim) == (
        a.text_width, a.text_layers, a.text_heads, a.context_length, a.vocab_size, a.embed_dim)
    assert (cfg.method, cfg.loss.kind, t.tokenizer, v.pre_norm, v.norm_eps, t.norm_eps) == (
        "clip", "infonce", "clip-bpe", True, 1e-5, 1e-5)


def test_arch_is_checked(tmp_path: Path) -> None:
    ref = _small(quick_gelu=True)
    src = tmp_path / "small.safetensors"
    save_file(_contiguous(ref.state_dict()), str(src))
    source = read_source(src)
    with pytest.raises(ConversionError, match=r"does not match --arch ViT-B-32: image width 128 \(ViT-B-32 has 768\)"):
        read_open_clip(source, "ViT-B-32")
    with pytest.raises(ConversionError, match=r"pass --arch .*quickgelu"):
        read_open_clip(source, None)
    with pytest.raises(ConversionError, match="unknown --arch 'ViT-X'"):
        read_open_clip(source, "ViT-X")
    with pytest.raises(ConversionError, match="OpenAI checkpoints use QuickGELU"):
        read_openai(source, "gelu")


def test_writer_refuses_other_layouts() -> None:
    from vlp_core.clip import METHOD

    cfg = METHOD.preset("demo")  # no ln_pre, GELU with eps 1e-6: not an OpenCLIP tower
    with pytest.raises(ConversionError, match=r"cannot write open_clip from a vlp model: .*pre_norm"):
        to_open_clip(Converted({}, cfg, "vlp"))
