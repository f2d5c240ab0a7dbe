"""Evaluators end to end: dummy model + EmbeddingScorer + shard readers vs float64 brute force."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vlp_eval_testutils import (
    CLASSES,
    TEMPLATES,
    DummyModel,
    jpeg_bytes,
    ref_image_emb,
    ref_recall,
    ref_text_emb,
    retrieval_samples,
    write_shards,
    write_tiny_eval_sets,
    write_zeroshot,
)

from vlp_core.config import EvalConfig
from vlp_core.data.tario import iter_samples
from vlp_core.eval import (
    EmbeddingScorer,
    compositional_eval,
    load_compositional_shards,
    load_retrieval_shards,
    load_zeroshot_shards,
    retrieval_eval,
    run_evaluation,
    zeroshot_eval,
)
from vlp_core.method import Scorer

S = 16


def test_embedding_scorer_states(model: DummyModel, tokenizer) -> None:
    scorer = EmbeddingScorer(model)
    assert isinstance(scorer, Scorer)
    tokens_CTL = tokenizer([t.format(c) for c in CLASSES for t in TEMPLATES]).view(len(CLASSES), 3, -1)
    got = scorer.class_states(tokens_CTL)
    per_prompt = ref_text_emb(model, tokenizer, [t.format(c) for c in CLASSES for t in TEMPLATES])
    want = F.normalize(per_prompt.view(len(CLASSES), 3, -1).mean(1), dim=-1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    img = torch.randn(4, 3, S, S)
    states = scorer.image_states(img)
    torch.testing.assert_close(states.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(scorer.score(states, got), states @ got.T)


def test_zeroshot_eval_matches_reference(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    jpgs, labels = write_zeroshot(tmp_path / "zs", 30, CLASSES, TEMPLATES, seed=2)
    batches, classnames, templates = load_zeroshot_shards(tmp_path / "zs", image_size=S, batch_size=8)
    model.train()
    model.frozen.eval()
    # batch_size 4 < reader batches (8) and < C*T prompts: exercises re-chunking of images and classes.
    got = zeroshot_eval(
        EmbeddingScorer(model), batches, classnames, templates, tokenizer, device="cpu", batch_size=4
    )
    assert model.training and not model.frozen.training  # each submodule's mode restored
    img = ref_image_emb(model, jpgs, S)
    prompts = ref_text_emb(model, tokenizer, [t.format(c) for c in CLASSES for t in TEMPLATES])
    cls = F.normalize(prompts.view(len(CLASSES), len(TEMPLATES), -1).mean(1), dim=-1)
    scores = (img @ cls.T).numpy()
    order = np.argsort(-scores, axis=1)
    lab = np.array(labels)
    assert got["n"] == 30
    assert got["top1"] == pytest.approx(100 * np.mean(order[:, 0] == lab))
    assert got["top5"] == pytest.approx(100 * np.mean([lab[i] in order[i, :5] for i in range(30)]))
    assert 0 < got["top1"] < 100  # a discriminating case, not a trivial 0 or 100


def test_zeroshot_without_top5_for_few_classes(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    write_zeroshot(tmp_path / "zs", 5, CLASSES[:3], TEMPLATES, seed=3)
    batches, classnames, templates = load_zeroshot_shards(tmp_path / "zs", image_size=S)
    got = zeroshot_eval(EmbeddingScorer(model), batches, classnames, templates, tokenizer, device="cpu")
    assert set(got) == {"top1", "n"}


def test_retrieval_eval_matches_reference(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    samples, caps = retrieval_samples(15, seed=4)
    samples[6] = {**samples[6], "jpg": b"broken"}  # its captions must drop out of the evaluation
    write_shards(tmp_path / "ret", samples, max_count=4)
    batches, captions, c2i = load_retrieval_shards(tmp_path / "ret", image_size=S, batch_size=4)
    got = retrieval_eval(
        EmbeddingScorer(model), batches, captions, c2i, tokenizer, device="cpu", batch_size=3, chunk_size=4
    )
    assert batches.skipped == 1
    keep = [i for i in range(15) if i != 6]
    img = ref_image_emb(model, [samples[i]["jpg"] for i in keep], S)
    kept_caps = [(c, keep.index(i)) for i, cs in enumerate(caps) if i != 6 for c in cs]
    txt = ref_text_emb(model, tokenizer, [c for c, _ in kept_caps])
    want = ref_recall((img @ txt.T).numpy(), np.array([r for _, r in kept_caps]))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["n_texts"] == len(kept_caps) and got["n_images"] == len(keep) - 1  # image 2: no caption


def test_compositional_eval(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    rng = np.random.default_rng(5)
    words = ["red", "blue", "circle", "square", "left", "right"]
    rows = [
        {"positive": " ".join(rng.choice(words, 3)), "negative": " ".join(rng.choice(words, 3))}
        for _ in range(13)
    ]
    rows[0]["negative"] = rows[0]["positive"]  # a tie is a miss
    jpgs = [jpeg_bytes(50 + i) for i in range(13)]
    write_shards(tmp_path / "comp", [{"jpg": j, "json": json.dumps(r)} for j, r in zip(jpgs, rows)])
    batches = load_compositional_shards(tmp_path / "comp", image_size=S, batch_size=5)
    got = compositional_eval(EmbeddingScorer(model), batches, tokenizer, device="cpu", batch_size=4)
    img = ref_image_emb(model, jpgs, S)
    pos = (img * ref_text_emb(model, tokenizer, [r["positive"] for r in rows])).sum(1)
    neg = (img * ref_text_emb(model, tokenizer, [r["negative"] for r in rows])).sum(1)
    correct = (pos > neg).numpy()
    correct[0] = False
    assert got["n"] == 13
    assert got["accuracy"] == pytest.approx(100 * correct.mean())


def test_run_evaluation(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    write_tiny_eval_sets(tmp_path)
    imagefolder = tmp_path / "imf"
    for c in ("a_b", "c"):
        (imagefolder / c).mkdir(parents=True)
        (imagefolder / c / "0.jpg").write_bytes(jpeg_bytes(len(c)))
    cfg = EvalConfig(zeroshot="zeroshot_shape, ,zeroshot_color,", imagefolder=str(imagefolder), batch_size=4)
    lines: list[str] = []
    out = run_evaluation(
        EmbeddingScorer(model), tokenizer, cfg, root=tmp_path, image_size=S, device="cpu", log=lines.append
    )
    assert {
        "zeroshot_shape/top1",
        "zeroshot_color/top1",
        "imf/top1",
        "retrieval/i2t_R@1",
        "retrieval/mean_recall",
        "compositional/accuracy",
    } <= set(out)
    assert out["retrieval/skipped"] == 1 and out["zeroshot_shape/skipped"] == 0
    assert out["imf/n"] == 2 and out["compositional/n"] == 4
    assert len(lines) == 5
    # The same sets found through cfg.data pointing straight at the eval folder.
    cfg2 = EvalConfig(data=str(tmp_path / "eval"), zeroshot="zeroshot_color", retrieval="", compositional="")
    out2 = run_evaluation(
        EmbeddingScorer(model),
        tokenizer,
        cfg2,
        root="/nonexistent",
        image_size=S,
        device="cpu",
        log=lines.append,
    )
    assert out2 == {k: v for k, v in out.items() if k.startswith("zeroshot_color/")}


def test_run_evaluation_missing_set_names_it(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    write_tiny_eval_sets(tmp_path)
    cfg = EvalConfig(zeroshot="zeroshot_shape,zeroshot_typo")
    with pytest.raises(ValueError, match="zeroshot_typo"):
        run_evaluation(EmbeddingScorer(model), tokenizer, cfg, root=tmp_path, image_size=S, device="cpu")
    with pytest.raises(ValueError, match="no_such_folder"):
        cfg = EvalConfig(zeroshot="zeroshot_shape", imagefolder=str(tmp_path / "no_such_folder"))
        run_evaluation(EmbeddingScorer(model), tokenizer, cfg, root=tmp_path, image_size=S, device="cpu")


def test_bf16_autocast_runs(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    write_zeroshot(tmp_path / "zs", 4, CLASSES, TEMPLATES, seed=9)
    batches, classnames, templates = load_zeroshot_shards(tmp_path / "zs", image_size=S)
    got = zeroshot_eval(
        EmbeddingScorer(model), batches, classnames, templates, tokenizer, device="cpu", dtype=torch.bfloat16
    )
    assert got["n"] == 4 and 0 <= got["top1"] <= 100


def test_run_evaluation_on_generated_shapes_world(tiny_world: Path, model: DummyModel, tokenizer) -> None:
    # ``tiny_world`` is the session fixture of core/tests/conftest.py: the real ``vlp-data synth`` layout.
    sizes = {}
    for name in ("zeroshot_shape", "zeroshot_color", "zeroshot_color_shape", "retrieval", "compositional"):
        # Counted independently of the readers under test.
        sizes[name] = sum(
            1 for url in sorted((tiny_world / "eval" / name).glob("*.tar")) for _ in iter_samples(str(url))
        )
    model64 = DummyModel(image_size=64, dim=8, seed=1)
    out = run_evaluation(
        EmbeddingScorer(model64),
        tokenizer,
        EvalConfig(),
        root=tiny_world,
        image_size=64,
        device="cpu",
        log=print,
    )
    for name in ("zeroshot_shape", "zeroshot_color", "zeroshot_color_shape"):
        assert out[f"{name}/n"] == sizes[name] and out[f"{name}/skipped"] == 0
        assert 0 <= out[f"{name}/top1"] <= out[f"{name}/top5"] <= 100
    assert out["retrieval/n_images"] == sizes["retrieval"] and out["retrieval/n_texts"] > 0
    assert out["compositional/n"] == sizes["compositional"]
