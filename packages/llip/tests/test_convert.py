"""Llip's released checkpoint layout -> vlp: a re-statement of the official model (``llip_official``) with random
weights is saved as the official training checkpoints are, read back through the core's safe loader, detected,
converted, loaded strictly, and the vlp model must reproduce the official outputs in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llip_official import OfficialLlip
from vlp_llip import LLIP_READER, METHOD, LlipScorer
from vlp_llip.convert import read_llip
from vlp_llip.xattn import conditioned_embeddings

from vlp_core.convert import ConversionError, Source, detect_reader, read_source
from vlp_core.convert.build import check_converted
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.train.loop import TrainStep

# Small towers with OpenAI's real vocabulary, so that the captions are real clip-bpe tokens (EOT = the largest id).
SIZES = dict(K=4, image_size=32, patch=8, vision_width=128, vision_layers=2, vocab_size=49408, context_length=16,
             text_width=64, text_layers=2, embed_dim=32)
# (official settings, --arch). Without --arch the official rules apply: head width 64 in both towers (2 image
# heads, 1 text head here), 8 cross-attention heads, tau 5.
CASES = {
    "official_rules": (dict(vision_heads=2, text_heads=1, heads=8, tau=5.0, use_norm=False, vision_mlp=300), None),
    "norm_and_arch": (dict(vision_heads=4, text_heads=4, heads=4, tau=2.0, use_norm=True, vision_mlp=512),
                      "tau=2,heads=4,vision_heads=4,text_heads=4"),
}
CAPTIONS = ["a red circle", "two blue squares next to a small green triangle", "cat",
            "a photo of a very long caption that goes on and on past the sixteen token context", "the dog"]


def official(case: str, seed: int = 0) -> OfficialLlip:
    torch.manual_seed(seed)
    model = OfficialLlip(**SIZES, **CASES[case][0]).eval()
    model.perturb(seed + 1)
    return model


def batch(n: int = 5) -> dict[str, torch.Tensor]:
    tok = Tokenizer.from_pretrained("clip-bpe", context_length=SIZES["context_length"])
    tokens = tok(CAPTIONS[:n])
    assert tokens[3, -1] == tok.eot_id  # the long caption is cut with its EOT kept at the last position
    return {"images": torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2)), "tokens": tokens}


def save_like_official(model: OfficialLlip, path: Path) -> Path:
    """A training checkpoint as the official trainer writes it: DDP ``module.`` keys under ``state_dict``."""
    torch.save({"epoch": 32, "name": "llip_tiny",
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    err = float((got.detach() - want.detach()).abs().max())
    scale = float(want.abs().max())
    assert err <= tol * scale, f"{what}: max |diff| {err:.3g} > {tol} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_converted_checkpoint_reproduces_the_official_model(case: str, tmp_path: Path) -> None:
    settings, arch = CASES[case]
    ref = official(case)
    source = read_source(save_like_official(ref, tmp_path / "llip_tiny.pt"))
    reader = detect_reader(source)
    assert reader.name == "llip"
    converted = reader.read(source, arch)
    check_converted(converted)  # the core's check: keys and shapes of the model the config builds

    cfg = converted.config
    v, t = cfg.model.vision, cfg.model.text
    assert (cfg.method, converted.layout) == ("llip", "llip")
    assert (v.heads, t.heads, cfg.loss.heads, cfg.loss.tau, cfg.loss.use_norm) == (
        settings["vision_heads"], settings["text_heads"], settings["heads"], settings["tau"], settings["use_norm"])
    assert (v.act, t.act, v.pre_norm, v.norm_eps, t.norm_eps) == ("quick_gelu", "quick_gelu", True, 1e-5, 1e-5)
    assert (v.extra_tokens, v.class_token, v.image_size, int(v.width * v.mlp_ratio)) == (
        4, False, 32, settings["vision_mlp"])
    assert (t.tokenizer, t.vocab_size, t.context_length, v.interpolation) == ("clip-bpe", 49408, 16, "bicubic")

    tok = Tokenizer.from_pretrained("clip-bpe", context_length=16)
    step = TrainStep(METHOD.build_model(cfg, tok), METHOD.build_loss(cfg)).eval()
    step.load_state_dict(converted.state_dict, strict=True)
    model, b = step.model, batch()
    with torch.no_grad():
        h_ref, keys_ref, values_ref = ref.encode_image(b["images"])
        query_ref, target_ref = ref.encode_text(b["tokens"])
        h = model.mixture_tokens(b["images"])
        close(h, h_ref, "mixture tokens after ln_post")
        close(model.mixture.keys(h), keys_ref, "keys")
        close(model.mixture.values(h), values_ref, "values")
        query, target = model.encode_text_pair(b["tokens"])
        close(query, query_ref, "text queries")
        close(target, target_ref, "text targets")
        # every image conditioned on every caption (folded output projection vs the official unfolded one)
        z = conditioned_embeddings(model.mixture.keys(h), model.mixture.folded_values(h), query, cfg.loss.tau)
        close(z, ref.conditioned(keys_ref, values_ref, query_ref), "conditioned embeddings z[i | q_j]")
        scorer = LlipScorer(model)
        scores = scorer.score(scorer.image_states(b["images"]), scorer.text_states(b["tokens"]))
        close(scores, ref.scores(b["images"], b["tokens"]), "evaluation scores cos(z[i | q_j], zt_j)")
        close(step(b).loss, ref.loss(b["images"], b["tokens"]), "sigmoid loss (logit scale and bias)")


@pytest.fixture(scope="module")
def released() -> dict[str, torch.Tensor]:
    return official("official_rules").state_dict()


def test_legacy_key_names_convert_the_same(released: dict[str, torch.Tensor]) -> None:
    """The official evaluation also accepts a top-level ``out_proj`` (older checkpoints); so does the reader."""
    legacy = dict(released)
    legacy["out_proj"] = legacy.pop("pred.out_proj")
    a = read_llip(Source(path=Path("new.pt"), state_dict=released))
    b = read_llip(Source(path=Path("old.pt"), state_dict=legacy))
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def _drop(key: str):
    return lambda sd: sd.pop(key)


def _set(key: str, shape: tuple[int, ...]):
    return lambda sd: sd.__setitem__(key, torch.zeros(shape))


@pytest.mark.parametrize("change, message", [
    (_drop("visual.transformer.resblocks.1.mlp.c_proj.bias"), r"missing keys: visual\.transformer\.resblocks\.1\."),
    (_drop("visual.conv1.weight"), r"missing key 'visual\.conv1\.weight'"),
    (_set("k_proj", (4, 128, 33)), r"wrong shapes: k_proj \[4, 128, 33\] \(expected \[4, 128, 32\]\)"),
    (_set("transformer.resblocks.0.attn.in_proj_weight", (3 * 64, 32)), r"wrong shapes: transformer\.resblocks\.0"),
    (_set("visual.positional_embedding", (4 + 15, 128)), r"positional_embedding has 19 rows"),
    (_set("visual.proj", (128, 32)), r"visual\.proj is present"),
    (_set("foo.weight", (3,)), r"unexpected keys: foo\.weight"),
], ids=["missing", "missing_anchor", "k_proj_shape", "text_qkv_shape", "positions", "visual_proj", "unexpected"])
def test_bad_checkpoints_give_one_line_errors_naming_file_and_key(released, change, message) -> None:
    sd = dict(released)
    change(sd)
    with pytest.raises(ConversionError, match=message) as e:
        read_llip(Source(path=Path("/ckpt/llip_b16_k32.pt"), state_dict=sd))
    assert str(e.value).startswith("/ckpt/llip_b16_k32.pt: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("arch, message", [
    ("tau=abc", "tau must be a number"),
    ("depth=3", "use one of llip_b16_k32"),
    ("llip_b16_k32", "not those of --arch llip_b16_k32"),
    ("heads=5", "cross-attention heads 5 do not divide the width 32"),
])
def test_bad_arch_is_a_clear_error(released, arch: str, message: str) -> None:
    with pytest.raises(ConversionError, match=message):
        read_llip(Source(path=Path("llip.pt"), state_dict=released), arch)


def test_llip_is_detected_before_the_openai_layouts_and_clip_is_not_taken_for_llip(released) -> None:
    import vlp_core.convert.openai_clip  # noqa: F401 - registers the OpenAI/OpenCLIP readers (same visual.* keys)

    assert detect_reader(Source(Path("x.pt"), released)).name == "llip"
    plain = {k: v for k, v in released.items() if k not in ("k_proj", "v_proj", "q_proj")}
    assert not LLIP_READER.detect(Source(Path("x.pt"), plain))
