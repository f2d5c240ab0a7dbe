"""CLIP_benchmark webdataset sets, written the way ``clip_benchmark.webdataset_builder.convert_dataset`` does
(webdataset's own ShardWriter, ``<split>/%d.tar``, keys ``s%07d``, an int ``cls``, ``nshards.txt``).

Shape legend:
    B: batch    N: images    M: captions    C: classes
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset
from PIL import Image
from vlp_eval_testutils import CLASSES, TEMPLATES, DummyModel, ref_image_emb, ref_recall, ref_text_emb

from vlp_core.config import EvalConfig
from vlp_core.data.tario import iter_samples
from vlp_core.eval import EmbeddingScorer, retrieval_eval, run_evaluation, zeroshot_eval
from vlp_core.eval.clip_benchmark import (
    load_wds_classification,
    load_wds_retrieval,
    open_wds_set,
    parse_wds_specs,
)

S = 16
COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def image_bytes(rgb_or_seed, fmt: str) -> bytes:
    """A solid colour (a tuple) or random noise (an int seed), encoded losslessly as ``fmt``."""
    if isinstance(rgb_or_seed, tuple):
        arr = np.zeros((12, 14, 3), dtype=np.uint8) + np.array(rgb_or_seed, dtype=np.uint8)
    else:
        arr = np.random.default_rng(rgb_or_seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    buf = io.BytesIO()
    options = {"webp": {"format": "webp", "lossless": True}, "png": {"format": "png"}, "jpg": {"format": "jpeg"}}
    Image.fromarray(arr).save(buf, **options[fmt])
    return buf.getvalue()


def write_clip_benchmark_set(root: Path, samples: list[tuple[str, bytes, object]], *, classnames=None,
                             templates=None, retrieval: bool = False, max_count: int = 1) -> None:
    """``samples``: ``(image ext, image bytes, label int | captions list)``, written as CLIP_benchmark does."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    if classnames is not None:
        with open(root / "classnames.txt", "w") as f:
            print(*classnames, sep="\n", end="\n", file=f)
    if templates is not None:
        with open(root / "zeroshot_classification_templates.txt", "w") as f:
            print(*templates, sep="\n", end="\n", file=f)
    if retrieval:
        (root / "dataset_type.txt").write_text("retrieval\n")
    sink = webdataset.ShardWriter(os.path.join(root, "test", r"%d.tar"), maxcount=max_count, verbose=0)
    for index, (ext, data, target) in enumerate(samples):
        member = {"txt": "\n".join(target)} if retrieval else {"cls": target}
        sink.write({"__key__": f"s{index:07d}", ext: data, **member})
    num_shards = sink.shard
    sink.close()
    with open(root / "test" / "nshards.txt", "w") as f:
        print(num_shards, end="\n", file=f)


class ColorScorer:
    """A fixed, hand-checkable scorer: an image's state is its mean normalised pixel per channel (solid red
    -> largest R), a prompt's state counts the words red/green/blue; score = dot product."""

    def __init__(self, tokenizer) -> None:
        self.ids = torch.tensor([tokenizer([w])[0, 0].item() for w in COLORS])

    def image_states(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return images_BCHW.float().mean(dim=(2, 3))

    def text_states(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return (tokens_BL.unsqueeze(-1) == self.ids).sum(dim=1).float()

    def class_states(self, tokens_CTL: torch.Tensor) -> torch.Tensor:
        C, T, L = tokens_CTL.shape
        return self.text_states(tokens_CTL.reshape(C * T, L)).view(C, T, -1).mean(dim=1)

    def score(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        return image_states @ text_states.T


def _color_set(root: Path) -> list[int]:
    """13 solid-colour images in 13 shards (so ``10.tar`` sorts after ``9.tar``); 4 carry a wrong label."""
    colors = ["red", "green", "blue", "red", "blue", "green", "green", "red", "blue", "blue", "red", "green", "red"]
    labels = [list(COLORS).index(c) for c in colors]
    for i in (1, 4, 9, 12):  # wrong labels: green->blue, blue->red, blue->green, red->green
        labels[i] = [2, 0, 1, 1][(1, 4, 9, 12).index(i)]
    fmts = ["webp", "png", "jpg"]
    samples = [(fmts[i % 3], image_bytes(COLORS[c], fmts[i % 3]), lab) for i, (c, lab) in enumerate(zip(colors,
                                                                                                       labels))]
    write_clip_benchmark_set(root, samples, classnames=list(COLORS), templates=["a photo of a {c}.", "a {c} thing."])
    return labels


def test_layout_is_what_clip_benchmark_writes(tmp_path: Path) -> None:
    root = tmp_path / "wds_colors"
    labels = _color_set(root)
    assert (root / "test" / "nshards.txt").read_text() == "13\n"
    first = next(iter_samples(str(root / "test" / "0.tar")))
    assert first["__key__"] == "s0000000" and first["cls"] == b"0" and "webp" in first
    ws = open_wds_set(root)
    assert ws.name == "colors" and ws.kind == "classification" and ws.classnames == ["red", "green", "blue"]
    assert ws.templates == ["a photo of a {}.", "a {} thing."]
    assert [Path(u).name for u in ws.urls] == [f"{i}.tar" for i in range(13)]  # numeric, not 0, 1, 10, ...
    batches = load_wds_classification(ws, image_size=S, batch_size=5)
    got = [b for b in batches]
    assert [b[0].shape[0] for b in got] == [5, 5, 3] and got[0][0].dtype == torch.uint8
    assert torch.cat([b[1] for b in got]).tolist() == labels
    shares = [load_wds_classification(ws, image_size=S, rank=r, world_size=2) for r in range(2)]
    assert [torch.cat([b[1] for b in s]).tolist() for s in shares] == [labels[0::2], labels[1::2]]


def test_zeroshot_accuracy_by_hand(tmp_path: Path, tokenizer) -> None:
    labels = _color_set(tmp_path / "wds_colors")
    ws = open_wds_set(tmp_path / "wds_colors")
    got = zeroshot_eval(ColorScorer(tokenizer), load_wds_classification(ws, image_size=S, batch_size=4),
                        ws.classnames, ws.templates, tokenizer, device="cpu", batch_size=4, per_class=True)
    # Every image is classified as its colour; the 4 relabelled ones are the misses.
    assert got["n"] == 13 and got["top1"] == pytest.approx(100 * 9 / 13)
    # Per label, counted by hand: red = images 0,3,7,10 (red) and 4 (blue) -> 4/5; green = 5,6,11 (green),
    # 9 (blue) and 12 (red) -> 3/5; blue = 2,8 (blue) and 1 (green) -> 2/3.
    assert got["mean_per_class_recall"] == pytest.approx(100 * (4 / 5 + 3 / 5 + 2 / 3) / 3)
    assert labels.count(0) == 5 and labels.count(1) == 5 and labels.count(2) == 3


def test_zeroshot_matches_float64_reference(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    rng = np.random.default_rng(0)
    labels = [int(rng.integers(0, len(CLASSES))) for _ in range(24)]
    imgs = [image_bytes(100 + i, "webp") for i in range(24)]
    templates_c = [t.replace("{}", "{c}") for t in TEMPLATES]
    write_clip_benchmark_set(tmp_path / "set", [("webp", b, lab) for b, lab in zip(imgs, labels)],
                             classnames=CLASSES, templates=templates_c, max_count=5)
    ws = open_wds_set(tmp_path / "set", name="six")
    got = zeroshot_eval(EmbeddingScorer(model), load_wds_classification(ws, image_size=S, batch_size=7),
                        ws.classnames, ws.templates, tokenizer, device="cpu", batch_size=4)
    img = ref_image_emb(model, imgs, S)
    cls = F.normalize(ref_text_emb(model, tokenizer, [t.format(c) for c in CLASSES for t in TEMPLATES])
                      .view(len(CLASSES), len(TEMPLATES), -1).mean(1), dim=-1)
    order = np.argsort(-(img @ cls.T).numpy(), axis=1)
    lab = np.array(labels)
    assert got["top1"] == pytest.approx(100 * np.mean(order[:, 0] == lab))
    assert got["top5"] == pytest.approx(100 * np.mean([lab[i] in order[i, :5] for i in range(24)]))
    assert 0 < got["top1"] < 100


def test_retrieval_set(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    words = ["red", "blue", "green", "circle", "square", "small", "large"]
    rng = np.random.default_rng(3)
    caps = [[" ".join(rng.choice(words, 3)) for _ in range(int(rng.integers(1, 4)))] for _ in range(9)]
    caps[4] = ["", "  ", caps[4][0]]  # blank lines are not captions
    imgs = [image_bytes(200 + i, "png") for i in range(9)]
    write_clip_benchmark_set(tmp_path / "wds_flickr_mini", list(zip(["png"] * 9, imgs, caps)), retrieval=True,
                             max_count=4)
    ws = open_wds_set(tmp_path / "wds_flickr_mini")
    assert ws.kind == "retrieval" and ws.name == "flickr_mini"
    batches, captions, c2i = load_wds_retrieval(ws, image_size=S, batch_size=4)
    clean = [[c for c in cs if c.strip()] for cs in caps]
    assert captions == [c for cs in clean for c in cs]
    got = retrieval_eval(EmbeddingScorer(model), batches, captions, c2i, tokenizer, device="cpu", batch_size=3)
    want = ref_recall((ref_image_emb(model, imgs, S) @ ref_text_emb(model, tokenizer, captions).T).numpy(),
                      c2i.numpy())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_run_evaluation_with_wds_sets(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    _color_set(tmp_path / "wds_colors")
    write_clip_benchmark_set(tmp_path / "ret", [("jpg", image_bytes(i, "jpg"), ["a red circle"]) for i in range(3)],
                             retrieval=True)
    cfg = EvalConfig(zeroshot="", retrieval="", compositional="", batch_size=4)
    cfg.wds = f"{tmp_path / 'wds_colors'}, mini={tmp_path / 'ret'}"  # type: ignore[attr-defined]
    lines: list[str] = []
    out = run_evaluation(ColorScorer(tokenizer), tokenizer, cfg, root=tmp_path, image_size=S, device="cpu",
                         log=lines.append)
    assert out["colors/top1"] == pytest.approx(100 * 9 / 13) and out["colors/n"] == 13
    assert out["colors/skipped"] == 0 and "colors/mean_per_class_recall" in out
    assert out["mini/n_texts"] == 3 and "mini/i2t_R@1" in out and len(lines) == 2
    cfg.wds = [str(tmp_path / "wds_colors"), f"colors={tmp_path / 'ret'}"]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="colors"):
        run_evaluation(ColorScorer(tokenizer), tokenizer, cfg, root=tmp_path, image_size=S, device="cpu")


def test_specs_and_names(tmp_path: Path) -> None:
    assert parse_wds_specs(" /a/wds_x , n=/b/c,,") == [(None, Path("/a/wds_x")), ("n", Path("/b/c"))]
    assert parse_wds_specs(["/data/a=b"]) == [(None, Path("/data/a=b"))]
    snap = tmp_path / "datasets--clip-benchmark--wds_vtab-cifar10" / "snapshots" / "0123abcd"
    write_clip_benchmark_set(snap, [("png", image_bytes(1, "png"), 0)], classnames=["cat"], templates=["{c}"])
    assert open_wds_set(snap).name == "vtab-cifar10"


def test_errors_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_clip_benchmark_set(root, [("png", image_bytes(1, "png"), 3)], classnames=["a", "b"], templates=["{c}!"])
    with pytest.raises(ValueError, match="outside the 2 classes of .*classnames.txt"):
        list(load_wds_classification(open_wds_set(root), image_size=S))
    (root / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(ValueError, match="1.tar"):
        open_wds_set(root)
    (root / "test" / "nshards.txt").unlink()  # without it: every *.tar
    assert len(open_wds_set(root).urls) == 1
    (root / "classnames.txt").write_text("a\n\nb\n")
    with pytest.raises(ValueError, match="line 2 is empty"):
        open_wds_set(root)
    (root / "classnames.txt").unlink()
    with pytest.raises(ValueError, match="classnames.txt"):
        open_wds_set(root)
    (root / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(ValueError, match="multilabel"):
        open_wds_set(root)
    (root / "dataset_type.txt").unlink()
    (root / "classnames.txt").write_text("a\nb\n")
    (root / "zeroshot_classification_templates.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="placeholder"):
        open_wds_set(root)
    (root / "zeroshot_classification_templates.txt").unlink()
    assert open_wds_set(root).templates  # the default templates, with a warning
    with pytest.raises(ValueError, match="split folder"):
        open_wds_set(root, split="train")
    with pytest.raises(ValueError, match="not found"):
        open_wds_set(tmp_path / "missing")
