"""The shared text tower's one batched pass, and the two-caption adapter on the shapes world."""

import json

import pytest
import torch
from vlp_alip import METHOD

from vlp_core.data.tario import iter_samples
from vlp_core.method import SkipSample
from vlp_core.train.setup import load_tokenizer


@pytest.fixture()
def parts(noisy_world):
    cfg = METHOD.preset("smoke")
    tok = load_tokenizer(cfg, noisy_world)
    return cfg, tok, METHOD.build_model(cfg, tok), METHOD.build_adapter(cfg, tok)


def samples(world, n=8):
    return list(iter_samples(str(world / "train" / "00000.tar")))[:n]


def test_adapter_reads_raw_and_synthetic_caption(parts, noisy_world):
    _, tok, _, adapter = parts
    raw = samples(noisy_world, 40)
    out = [adapter(dict(s)) for s in raw]
    for s, o in zip(raw, out):
        meta = json.loads(s["json"])
        assert o["texts"] == s["txt"].decode().strip() == meta["raw"]
        assert o["captions"] == meta["clean"]
        assert o["raw_is_noisy"] is meta["raw_is_noisy"]
    assert any(o["raw_is_noisy"] for o in out) and not all(o["raw_is_noisy"] for o in out)
    batch = adapter.collate(out)
    assert batch["images"].shape == (40, 3, 32, 32) and batch["images"].dtype == torch.uint8
    assert torch.equal(batch["tokens"], tok([o["texts"] for o in out]))
    assert torch.equal(batch["caption_tokens"], tok([o["captions"] for o in out]))
    assert batch["raw_is_noisy"].tolist() == [o["raw_is_noisy"] for o in out]


def test_adapter_webdataset_member_and_missing_caption(parts, noisy_world):
    cfg, tok, _, _ = parts
    s = samples(noisy_world, 1)[0]
    cfg.loss.caption_key = "syn.txt"
    adapter = METHOD.build_adapter(cfg, tok)
    plain = {"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"], "syn.txt": b"a red circle."}
    o = adapter(dict(plain))
    assert o["captions"] == "a red circle." and "raw_is_noisy" not in o
    assert "raw_is_noisy" not in adapter.collate([o])
    with pytest.raises(SkipSample, match="synthetic caption: no caption under 'syn.txt'") as e:
        adapter({k: v for k, v in plain.items() if k != "syn.txt"})
    assert e.value.reason == "empty_caption"
    cfg.loss.missing_caption = "raw"
    fallback = METHOD.build_adapter(cfg, tok)({k: v for k, v in plain.items() if k != "syn.txt"})
    assert fallback["captions"] == fallback["texts"] == s["txt"].decode().strip()
    with pytest.raises(ValueError, match="missing_caption"):
        cfg.loss.missing_caption = "drop"
        METHOD.build_adapter(cfg, tok)


def test_one_text_pass_equals_two(parts, noisy_world):
    _, _, model, adapter = parts
    from vlp_core.data.transforms import prepare_images

    batch = adapter.collate([adapter(dict(s)) for s in samples(noisy_world)])
    batch["images"] = prepare_images(batch["images"], torch.device("cpu"))
    model.eval()
    calls = []
    hook = model.text.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    out = model(batch)
    hook.remove()
    assert calls == [(16, batch["tokens"].shape[1])]  # one forward over raw texts and captions together
    torch.testing.assert_close(out["text_features"], model.encode_text(batch["tokens"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["caption_features"], model.encode_text(batch["caption_tokens"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["image_features"], model.encode_image(batch["images"]))
    with pytest.raises(ValueError, match="caption tokens"):
        model({**batch, "caption_tokens": batch["caption_tokens"][:3]})


def test_presets_resolve():
    for name in METHOD.presets:
        cfg = METHOD.preset(name)
        cfg.validate()
        assert cfg.method == "alip"
    demo, ungated = METHOD.preset("demo"), METHOD.preset("demo_ungated")
    assert demo.data.world_noise == 0.4 and demo.loss.caption_key == "json.clean" and demo.loss.raw_key == "txt"
    assert not (ungated.loss.use_ws or ungated.loss.use_wt or ungated.loss.use_wc)
    from vlp_core.clip import METHOD as CLIP

    clip = CLIP.preset("demo")
    assert (demo.model, demo.train, demo.optim) == (clip.model, clip.train, clip.optim)  # equal budget
    b32 = METHOD.preset("alip_b32_yfcc15m")
    assert (b32.train.batch_size, b32.train.steps, b32.optim.lr, b32.optim.weight_decay) == (4096, 117696, 1e-3, 0.2)
    assert (b32.optim.beta1, b32.optim.beta2, b32.optim.eps) == (0.9, 0.98, 1e-8)
    assert b32.loss.momentum == 0.99 and b32.loss.h_init == 1.0 and b32.loss.gamma_s == b32.loss.gamma_p == 2
