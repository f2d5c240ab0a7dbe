"""Reader ``timm-eva`` against timm's own Eva (and OpenCLIP's EVA02 CLIP for the text tower).

Small EVA02 copies (``eva02_large_patch14_clip_224`` at depth 2, width 64, 2 heads) with random weights,
saved under ``tmp_path``; the image embedding must equal timm's ``model(x)`` (head output) within 1e-5 x max.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from vlp_core.clip import build_loss, build_model
from vlp_core.convert import eva
from vlp_core.convert.registry import ConversionError, Converted, detect_reader
from vlp_core.convert.safe_load import read_source
from vlp_core.train.loop import TrainStep

timm = pytest.importorskip("timm")

NAME = "eva02_large_patch14_clip_224"
SMALL = dict(depth=2, embed_dim=64, num_heads=2)
ARCH = f"{NAME}:num_heads=2"
V_CLIP = 49408


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    tol = 1e-5 * max(a.abs().max().item(), b.abs().max().item())
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter (timm inits norms to 1/0 and some biases to 0): every mapping is exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_eva() -> torch.nn.Module:
    return _randomize(timm.create_model(NAME, pretrained=False, num_classes=32, **SMALL))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def _vlp(conv: Converted, *, full: bool) -> TrainStep:
    """The converted model; an image-only conversion loads with exactly the text side missing."""
    cfg = conv.config
    vocab = cfg.model.text.vocab_size or 64
    tok = SimpleNamespace(vocab_size=vocab, pad_id=0, eot_id=vocab - 1, bos_id=vocab - 2)
    step = TrainStep(build_model(cfg, tok), build_loss(cfg)).eval()
    result = step.load_state_dict(conv.state_dict, strict=full)
    if not full:
        assert not result.unexpected_keys
        assert all(k.startswith(("model.text.", "model.text_proj.", "loss.")) for k in result.missing_keys)
    return step


def _save(sd: dict[str, torch.Tensor], path) -> object:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return read_source(path)


def test_timm_eva_state_dict_matches_timm(tmp_path, tiny_eva, images):
    source = _save(tiny_eva.state_dict(), tmp_path / "eva.safetensors")
    assert detect_reader(source).name == "timm-eva"
    conv = eva.read_timm_eva(source, ARCH)
    v = conv.config.model.vision
    assert (v.timm_name, v.timm_kwargs, v.image_size, v.pool) == (NAME, SMALL, 224, "token")
    assert (conv.config.model.image_proj, conv.config.model.embed_dim) == ("linear_bias", 32)
    assert set(conv.state_dict) == {f"model.visual.trunk.{k}" for k in tiny_eva.state_dict() if
                                    not k.startswith("head.")} | {"model.image_proj.weight", "model.image_proj.bias"}
    step = _vlp(conv, full=False)
    with torch.no_grad():
        _close(step.model.encode_image(images), tiny_eva(images))


def test_timm_hub_folder_needs_no_arch(tmp_path, tiny_eva):
    """timm's save_for_hf folder: config.json names the architecture and its model_args."""
    from timm.models import save_for_hf

    save_for_hf(tiny_eva, tmp_path / "hub", model_args=SMALL, safe_serialization=True)
    conv = eva.read_timm_eva(read_source(tmp_path / "hub"))
    assert conv.config.model.vision.timm_name == NAME and conv.config.model.vision.timm_kwargs == SMALL


def _to_eva_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Eva keys -> EVA-CLIP's own visual layout (the inverse of timm's checkpoint_filter_fn)."""
    names = [("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
             ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."),
             ("mlp.fc2.", "mlp.w3."), ("mlp.norm.", "mlp.ffn_ln.")]
    out = {}
    for k, v in sd.items():
        for a, b in names:
            k = k.replace(a, b)
        out["visual." + k] = v
    out["visual.rope.freqs_cos"] = torch.randn(256, 32)  # EVA-CLIP saves its RoPE tables; they are derived
    out["visual.rope.freqs_sin"] = torch.randn(256, 32)
    return out


def test_eva_clip_layout_gives_the_same_tower(tmp_path, tiny_eva, images):
    ref = eva.read_timm_eva(_save(tiny_eva.state_dict(), tmp_path / "timm.safetensors"), ARCH)
    source = _save(_to_eva_clip(tiny_eva.state_dict()), tmp_path / "eva_clip.safetensors")
    assert detect_reader(source).name == "timm-eva"
    conv = eva.read_timm_eva(source, ARCH)
    assert conv.state_dict.keys() == ref.state_dict.keys()
    assert all(torch.equal(conv.state_dict[k], ref.state_dict[k]) for k in ref.state_dict)


def test_open_clip_eva02_clip_is_a_complete_clip(tmp_path, tiny_eva, images):
    """OpenCLIP's EVA02 CLIP layout (CustomTextCLIP: visual.trunk.* + text.*): both towers, same embeddings."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CustomTextCLIP

    clip = CustomTextCLIP(
        embed_dim=32,
        vision_cfg=dict(timm_model_name="vit_tiny_patch16_224", timm_pool="token", timm_proj=None, image_size=224),
        text_cfg=dict(context_length=16, vocab_size=V_CLIP, width=32, heads=2, layers=2),
    )
    clip.visual.trunk = tiny_eva  # the tiny EVA02 in OpenCLIP's TimmModel adapter (head = the projection)
    clip = _randomize(clip)
    source = _save(clip.state_dict(), tmp_path / "open_clip.safetensors")
    assert detect_reader(source).name == "timm-eva"
    with pytest.raises(ConversionError, match="text width 32 does not split into 0 heads.*text_heads=N"):
        eva.read_timm_eva(source, ARCH)  # OpenAI's rule (width / 64) does not fit this tiny text tower
    conv = eva.read_timm_eva(source, ARCH + ",text_heads=2")
    t = conv.config.model.text
    assert (t.tokenizer, t.vocab_size, t.width, t.depth, t.heads, t.act, t.pool) == (
        "clip-bpe", V_CLIP, 32, 2, 2, "gelu", "eot")
    step = _vlp(conv, full=True)
    tokens = open_clip.tokenize(["a photo of a cat", "two dogs", "an EVA tower"], context_length=16)
    with torch.no_grad():
        _close(step.model.encode_image(images[:1]), clip.encode_image(images[:1]))
        _close(step.model.encode_text(tokens), clip.encode_text(tokens))
    assert torch.allclose(step.loss.loss.logit_scale, clip.logit_scale)


def test_eva_reader_errors(tmp_path, tiny_eva):
    sd = tiny_eva.state_dict()
    source = _save(sd, tmp_path / "eva.safetensors")
    with pytest.raises(ConversionError, match="cannot tell the timm Eva model from the shapes.*pass --arch"):
        eva.read_timm_eva(source)
    with pytest.raises(ConversionError, match="'vit_base_patch16_224' is not a timm Eva model"):
        eva.read_timm_eva(source, "vit_base_patch16_224")
    with pytest.raises(ConversionError, match="expected <timm name>"):
        eva.read_timm_eva(source, f"{NAME}:num_heads")
    with pytest.raises(ConversionError, match="timm cannot build eva02_large_patch14_clip_224 with .*bogus"):
        eva.read_timm_eva(source, f"{ARCH},bogus=1")
    missing = _save({k: v for k, v in sd.items() if k != "blocks.1.attn.k_proj.weight"}, tmp_path / "m.safetensors")
    with pytest.raises(ConversionError, match=r"m.safetensors: timm-eva: .*missing blocks.1.attn.k_proj.weight"):
        eva.read_timm_eva(missing, ARCH)
    stray = _save({**sd, "blocks.0.attn.extra.weight": torch.zeros(2)}, tmp_path / "s.safetensors")
    with pytest.raises(ConversionError, match="unexpected blocks.0.attn.extra.weight"):
        eva.read_timm_eva(stray, ARCH)
    eva_clip = _save({**_to_eva_clip(sd), "decoder.weight": torch.zeros(2)}, tmp_path / "d.safetensors")
    with pytest.raises(ConversionError, match="unexpected key.* decoder.weight beside the image tower under 'visual.'"):
        eva.read_timm_eva(eva_clip, ARCH)
    half_clip = _save({**{"visual." + k: v for k, v in sd.items()}, "logit_scale": torch.tensor(2.0)},
                      tmp_path / "h.safetensors")
    with pytest.raises(ConversionError, match="logit_scale without a text tower"):
        eva.read_timm_eva(half_clip, ARCH)


@pytest.mark.parametrize("name", ["eva02_large_patch14_clip_336", "eva02_base_patch16_clip_224"])
def test_full_size_name_inferred_from_shapes(tmp_path, name):
    """A full-size EVA-CLIP tower (shapes only: built on the meta device) needs no --arch; its config describes
    the EVA-CLIP model it came from (text tower sizes from OpenCLIP's configs, without text weights)."""
    from vlp_core.convert.registry import Source

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=768 if "large" in name else 512)
    source = Source(path=tmp_path / "eva_clip.pt", state_dict=_to_eva_clip(model.state_dict()))
    conv = eva.read_timm_eva(source)
    cfg = conv.config
    assert (cfg.model.vision.timm_name, cfg.model.vision.timm_kwargs) == (name, {})
    assert cfg.model.vision.image_size == (336 if "336" in name else 224)
    t = cfg.model.text
    assert (t.width, t.depth, t.heads, t.tokenizer, t.vocab_size) == (
        (768, 12, 12) if "large" in name else (512, 12, 8)) + ("clip-bpe", V_CLIP)
    assert not any(k.startswith(("model.text", "loss.")) for k in conv.state_dict)


def test_parse_arch():
    assert eva.parse_arch(f"{NAME}:num_heads=2, mlp_ratio=2.5,text_act=quick_gelu") == (
        NAME, {"num_heads": 2, "mlp_ratio": 2.5, "text_act": "quick_gelu"})
    assert eva.parse_arch(NAME) == (NAME, {})


def test_image_only_eva_converts_and_starts_a_run_tower(tmp_path, tiny_eva, images, capsys):
    """vlp-convert accepts an image-tower-only file; --init-from loads its tower; evaluation refuses it."""
    from vlp_core.clip.cli import eval_main
    from vlp_core.config import apply_overrides
    from vlp_core.convert.cli import main as vlp_convert
    from vlp_core.convert.vlp_format import load_vlp_checkpoint
    from vlp_core.train.init_from import init_from

    src = tmp_path / "eva.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_eva.state_dict().items()}, str(src))
    out = tmp_path / "eva_vlp.safetensors"
    assert vlp_convert([str(src), str(out), "--arch", ARCH]) == 0
    saved, config, _ = load_vlp_checkpoint(out)
    assert saved and not any(k.startswith("model.text.") for k in saved)

    conv = eva.read_timm_eva(read_source(src), ARCH)
    cfg = apply_overrides(conv.config, ["model.text.vocab_size=0", "model.text.width=32", "model.text.heads=2",
                                        "model.text.depth=1"])
    tok = SimpleNamespace(vocab_size=64, pad_id=0, eot_id=63, bos_id=62)
    step = TrainStep(build_model(cfg, tok), build_loss(cfg)).eval()
    parts = init_from(step, str(out), cfg)
    assert parts == {"loaded": ["model.visual", "model.image_proj"], "kept": ["model.text"]}
    with torch.no_grad():
        _close(step.model.encode_image(images), tiny_eva(images))

    assert eval_main([str(out), "--imagefolder", str(tmp_path)]) == 2
    assert "image tower only" in capsys.readouterr().err
