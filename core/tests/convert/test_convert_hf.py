"""Readers ``hf-clip`` / ``hf-siglip`` and the writer ``hf`` against transformers' own CLIPModel / SiglipModel.

Every model is small with random weights, saved with ``save_pretrained`` under ``tmp_path`` (no network).
Embeddings must agree within 1e-5 x their largest magnitude.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vlp_core.clip import build_loss, build_model
from vlp_core.clip.config import ClipConfig
from vlp_core.config import RunConfig
from vlp_core.convert import hf as hf_convert
from vlp_core.convert import hf_write
from vlp_core.convert.registry import ConversionError, Converted, Source, detect_reader
from vlp_core.train.loop import TrainStep

transformers = pytest.importorskip("transformers")

V_CLIP = 49408  # CLIP's BPE vocabulary: the reader maps it to vlp's "clip-bpe"


def _read(path) -> Source:
    from vlp_core.convert.safe_load import read_source

    return read_source(path)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    tol = 1e-5 * max(a.abs().max().item(), b.abs().max().item())
    assert (a - b).abs().max().item() <= tol, (a - b).abs().max().item()


def _vlp_model(conv: Converted, *, eot: int, bos: int | None, pad: int = 0) -> TrainStep:
    cfg = conv.config
    tok = SimpleNamespace(vocab_size=cfg.model.text.vocab_size, pad_id=pad, eot_id=eot, bos_id=bos)
    step = TrainStep(build_model(cfg, tok), build_loss(cfg)).eval()
    step.load_state_dict(conv.state_dict, strict=True)
    return step


def _clip_tokens(batch: int, length: int, vocab: int, *, eot: int, bos: int) -> torch.Tensor:
    """[BOS] random ids [EOT] then pads (0), of varied lengths, as vlp's/OpenCLIP's tokenizer writes them."""
    g = torch.Generator().manual_seed(1)
    rows = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = 2 + i % (length - 3)
        rows[i, 0] = bos
        rows[i, 1 : n + 1] = torch.randint(1, min(bos, eot), (n,), generator=g)
        rows[i, n + 1] = eot
    return rows


def _tiny_clip_config(act: str = "quick_gelu", vocab: int = V_CLIP, eos: int | None = None):
    return transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=16, vocab_size=vocab, hidden_act=act, layer_norm_eps=1e-5,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1 if eos is None else eos, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-5),
        projection_dim=24,
    )


def _tiny_siglip_config(vocab: int = 300):
    return transformers.SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=12, vocab_size=vocab, projection_size=48,
                         bos_token_id=None, eos_token_id=1, pad_token_id=2,
                         hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    )


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values everywhere (HF inits LayerNorms to 1/0, biases to 0): every mapping is exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.fill_(2.3)
            elif name.endswith("logit_bias"):
                p.fill_(-3.0)
            else:
                p.copy_(p + 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture
def hf_clip_dir(tmp_path):
    model = _randomize(transformers.CLIPModel(_tiny_clip_config()))
    model.save_pretrained(tmp_path / "hf_clip")
    return tmp_path / "hf_clip", model


@pytest.fixture
def hf_siglip_dir(tmp_path):
    model = _randomize(transformers.SiglipModel(_tiny_siglip_config()))
    model.save_pretrained(tmp_path / "hf_siglip")
    return tmp_path / "hf_siglip", model


# ---------------------------------------------------------------------------------------------------------
# readers


@pytest.mark.parametrize(("act", "eos"), [("quick_gelu", None), ("gelu", None), ("quick_gelu", 2)])
def test_hf_clip_reader_matches_transformers(tmp_path, act, eos):
    """eos 2: OpenAI's early HF configs, where HF pools at the argmax id (CLIP's EOT is the largest id)."""
    model = _randomize(transformers.CLIPModel(_tiny_clip_config(act, eos=eos)))
    model.save_pretrained(tmp_path / "m")
    source = _read(tmp_path / "m")
    assert detect_reader(source).name == "hf-clip"
    conv = hf_convert.read_hf_clip(source)
    cfg = conv.config
    assert (cfg.model.vision.act, cfg.model.text.act) == (act, act)
    assert cfg.model.text.tokenizer == "clip-bpe" and cfg.model.text.vocab_size == V_CLIP
    assert cfg.loss.kind == "infonce"
    step = _vlp_model(conv, eot=V_CLIP - 1, bos=V_CLIP - 2)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    tokens = _clip_tokens(3, 16, V_CLIP, eot=V_CLIP - 1, bos=V_CLIP - 2)
    with torch.no_grad():
        _close(step.model.encode_image(images), _features(model.get_image_features(pixel_values=images)))
        _close(step.model.encode_text(tokens), _features(model.get_text_features(input_ids=tokens)))
        assert torch.allclose(step.loss.loss.logit_scale, model.logit_scale)


def test_hf_clip_reader_other_vocab_keeps_folder_tokenizer(tmp_path):
    model = _randomize(transformers.CLIPModel(_tiny_clip_config(vocab=120)))
    model.save_pretrained(tmp_path / "m")
    conv = hf_convert.read_hf_clip(_read(tmp_path / "m"))
    assert conv.config.model.text.vocab_size == 120
    assert conv.config.model.text.tokenizer == ""  # no tokenizer files in the folder
    step = _vlp_model(conv, eot=119, bos=118)
    tokens = _clip_tokens(2, 16, 120, eot=119, bos=118)
    with torch.no_grad():
        _close(step.model.encode_text(tokens), _features(model.get_text_features(input_ids=tokens)))


def test_hf_siglip_reader_matches_transformers(hf_siglip_dir):
    path, model = hf_siglip_dir
    source = _read(path)
    assert detect_reader(source).name == "hf-siglip"
    conv = hf_convert.read_hf_siglip(source)
    cfg = conv.config
    assert cfg.model.vision.pool == "map" and not cfg.model.vision.class_token
    assert (cfg.model.image_proj, cfg.model.text_proj, cfg.loss.kind) == ("none", "linear_bias", "siglip")
    assert cfg.model.vision.image_mean == [0.5] * 3 and cfg.model.vision.interpolation == "bilinear"
    step = _vlp_model(conv, eot=1, bos=None, pad=2)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # SigLIP's own usage: padded to the maximum length, no attention mask (pads are attended to).
    tokens = torch.randint(3, 300, (3, 12), generator=torch.Generator().manual_seed(3))
    tokens[0, 5:] = 2
    tokens[1, 9:] = 2
    with torch.no_grad():
        _close(step.model.encode_image(images), _features(model.get_image_features(pixel_values=images)))
        _close(step.model.encode_text(tokens), _features(model.get_text_features(input_ids=tokens)))
        assert torch.allclose(step.loss.loss.logit_bias, model.logit_bias[0])


def test_hf_reader_errors(tmp_path, hf_clip_dir):
    path, _ = hf_clip_dir
    # A config.json of another model type.
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (path / "config.json").write_text(json.dumps(cfg))
    source = _read(path)
    assert detect_reader(source).name == "hf-clip"  # the keys say CLIP; the reader names the mismatch
    with pytest.raises(ConversionError, match="model_type is 'bert'.*expects 'clip'"):
        hf_convert.read_hf_clip(source)
    with pytest.raises(ConversionError, match="model_type is 'bert'.*expects 'siglip'"):
        hf_convert.read_hf_siglip(source)
    # A missing tensor, then a stray one.
    cfg["model_type"] = "clip"
    (path / "config.json").write_text(json.dumps(cfg))
    source = _read(path)
    del source.state_dict["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) vision_model.encoder.layers.1.self_attn.k_proj"):
        hf_convert.read_hf_clip(source)
    source = _read(path)
    source.state_dict["vision_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"unexpected tensor\(s\) vision_model.encoder.layers.2"):
        hf_convert.read_hf_clip(source)
    # Weights without their config.json.
    bare = Source(path=tmp_path / "w.safetensors", state_dict=_read(path).state_dict)
    with pytest.raises(ConversionError, match="needs the folder with its config.json"):
        hf_convert.read_hf_clip(bare)


# ---------------------------------------------------------------------------------------------------------
# writer


def test_hf_clip_round_trip_through_writer(tmp_path, hf_clip_dir):
    """HF -> vlp -> HF gives back every tensor exactly, and the written folder loads with CLIPModel."""
    path, model = hf_clip_dir
    conv = hf_convert.read_hf_clip(_read(path))
    hf_write.write_hf(conv, tmp_path / "out")
    again = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    ref = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, ref[k]), k
    proc = transformers.CLIPImageProcessor.from_pretrained(tmp_path / "out")
    assert (proc.crop_size["height"], proc.size["shortest_edge"], int(proc.resample)) == (32, 32, 3)


def _vlp_config(kind: str) -> RunConfig:
    """A small vlp CLIP (OpenAI-style towers) or SigLIP (MAP pool, non-causal last-token text) config."""
    cfg = RunConfig(loss=ClipConfig(kind="infonce" if kind == "clip" else "siglip"))
    v, t = cfg.model.vision, cfg.model.text
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 32, 8, 48, 2, 3
    t.context_length, t.width, t.depth, t.heads, t.tokenizer = 20, 32, 2, 2, "clip-bpe"
    if kind == "clip":
        v.act = t.act = "quick_gelu"
        v.pre_norm, v.norm_eps, cfg.model.embed_dim = True, 1e-5, 24
        v.interpolation = "bicubic"
    else:
        v.class_token, v.pool, v.act, t.act = False, "map", "gelu_tanh", "gelu_tanh"
        t.causal, t.mask_pads, t.pool = False, False, "last"
        cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj = 48, "none", "linear_bias"
        v.image_mean, v.image_std = [0.5] * 3, [0.5] * 3
    return cfg


def _random_vlp(kind: str) -> tuple[TrainStep, Converted]:
    cfg = _vlp_config(kind)
    tok = SimpleNamespace(vocab_size=V_CLIP, pad_id=0, eot_id=V_CLIP - 1, bos_id=V_CLIP - 2)
    torch.manual_seed(0)
    step = _randomize(TrainStep(build_model(cfg, tok), build_loss(cfg)))
    cfg.model.text.vocab_size = V_CLIP
    state = {k: v.detach().clone() for k, v in step.state_dict().items()}
    return step, Converted(state_dict=state, config=cfg, layout="vlp")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_vlp_to_hf_gives_same_embeddings(tmp_path, kind):
    step, conv = _random_vlp(kind)
    hf_write.write_hf(conv, tmp_path / "out")
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    model = cls.from_pretrained(tmp_path / "out").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = _clip_tokens(3, 20, V_CLIP, eot=V_CLIP - 1, bos=V_CLIP - 2)
    with torch.no_grad():
        _close(step.model.encode_image(images), _features(model.get_image_features(pixel_values=images)))
        _close(step.model.encode_text(tokens), _features(model.get_text_features(input_ids=tokens)))
        assert torch.allclose(model.logit_scale.reshape(()), step.loss.loss.logit_scale)


def test_written_clip_tokenizer_matches_open_clip(tmp_path):
    """Same ids as open_clip.tokenize up to EOT (HF pads with EOT, OpenCLIP with 0); same embeddings end to end."""
    open_clip = pytest.importorskip("open_clip")
    from vlp_core.data.tokenizer import Tokenizer

    step, conv = _random_vlp("clip")
    hf_write.write_hf(conv, tmp_path / "out")
    tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "out")
    captions = ["a photo of a cat", "Two DOGS playing in the snow!", "what's that?  it's 3.14 m long !",
                "naïve café, déjà vu", "a " * 40]
    ids = tok(captions, padding="max_length", truncation=True, max_length=20, return_tensors="pt")["input_ids"]
    ref = open_clip.tokenize(captions, context_length=20)
    real = torch.cumsum((ref == V_CLIP - 1).long(), dim=1) - (ref == V_CLIP - 1).long() == 0  # up to EOT
    assert torch.equal(ids[real], ref[real]) and bool((ids[~real] == V_CLIP - 1).all())
    model = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ours = step.model.encode_text(Tokenizer.from_pretrained("clip-bpe", context_length=20)(captions))
        _close(ours, _features(model.get_text_features(input_ids=ids)))
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.image_processor.size["shortest_edge"] == 32


def test_writer_refuses_models_hf_cannot_express(tmp_path):
    _, conv = _random_vlp("clip")
    conv.config.model.vision.pre_norm = False
    conv.config.model.text.pool = "mean"
    with pytest.raises(ConversionError, match="CLIPModel: .*pre_norm false.*text.pool 'mean'"):
        hf_write.write_hf(conv, tmp_path / "out")
    _, conv = _random_vlp("siglip")
    conv.config.model.text.mask_pads = True
    with pytest.raises(ConversionError, match="SiglipModel: text.mask_pads true"):
        hf_write.write_hf(conv, tmp_path / "out")
    _, conv = _random_vlp("clip")
    conv.state_dict["model.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match="no place in an HF clip model: model.extra.weight"):
        hf_write.write_hf(conv, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on failure


def test_open_clip_to_vlp_to_hf_round_trip(tmp_path):
    """A small OpenCLIP CLIP (QuickGELU) -> vlp (reader open_clip) -> HF folder: CLIPModel gives its embeddings."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    from vlp_core.convert.openai_clip import read_open_clip

    torch.manual_seed(0)
    ref = _randomize(CLIP(
        embed_dim=32, quick_gelu=True,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=64),
        text_cfg=dict(context_length=16, vocab_size=V_CLIP, width=64, heads=1, layers=2),
    ))
    torch.save(ref.state_dict(), tmp_path / "open_clip.pt")
    conv = read_open_clip(_read(tmp_path / "open_clip.pt"), "quickgelu")
    hf_write.write_hf(conv, tmp_path / "hf")
    model = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    captions = ["a photo of a cat", "a diagram of an EVA tower", "two dogs!"]
    ids = transformers.CLIPTokenizer.from_pretrained(tmp_path / "hf")(
        captions, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        _close(_features(model.get_image_features(pixel_values=images)), ref.encode_image(images))
        _close(_features(model.get_text_features(input_ids=ids)),
               ref.encode_text(open_clip.tokenize(captions, context_length=16)))
        assert torch.allclose(model.logit_scale, ref.logit_scale)


def _word_tokenizer(folder, vocab: int) -> None:
    """A small HF tokenizer (word level, ``</s>`` = 1, ``<pad>`` = 2) saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "</s>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                               pad_token="<pad>")
    tok.save_pretrained(folder)


def test_hf_siglip_round_trip_with_its_tokenizer(tmp_path, hf_siglip_dir):
    """HF SigLIP + tokenizer folder -> vlp -> HF: the same tensors, and the tokenizer travels along."""
    path, model = hf_siglip_dir
    _word_tokenizer(path, 300)
    conv = hf_convert.read_hf_siglip(_read(path))
    assert conv.config.model.text.tokenizer == str(path.resolve())
    hf_write.write_hf(conv, tmp_path / "out")
    again = transformers.SiglipModel.from_pretrained(tmp_path / "out").eval()
    ref = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, ref[k]), k
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("w5 w7 w9")["input_ids"] == [5, 7, 9] and tok.model_max_length == 12
    proc = transformers.SiglipImageProcessor.from_pretrained(tmp_path / "out")
    assert (proc.size["height"], proc.size["width"], int(proc.resample)) == (32, 32, 2)
    assert list(proc.image_mean) == [0.5] * 3
