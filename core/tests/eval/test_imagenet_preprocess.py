"""ImageNet from a plain folder of WordNet-id class folders, the shipped metadata, and configurable
preprocessing on every evaluation path.

Shape legend:
    N: images    C: classes    T: templates    D: embedding width
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from vlp_eval_testutils import (
    CLASSES,
    DummyModel,
    WordTokenizer,
    jpeg_bytes,
    ref_text_emb,
    write_tiny_eval_sets,
)

from vlp_core.config import EvalConfig, VisionConfig
from vlp_core.data.transforms import build_transform, decode_image, prepare_images
from vlp_core.eval import (
    EmbeddingScorer,
    imagefolder_set_name,
    imagenet_classnames,
    imagenet_templates,
    imagenet_wnids,
    load_imagefolder,
    preprocess_kwargs,
    run_evaluation,
)
from vlp_core.eval.linear_probe import run_linear_probe

S = 16
SIGLIP = [0.5, 0.5, 0.5]


def test_shipped_metadata_matches_its_sources() -> None:
    zsm = pytest.importorskip("open_clip.zero_shot_metadata")
    assert imagenet_classnames() == list(zsm.IMAGENET_CLASSNAMES)
    assert [t.format("dog") for t in imagenet_templates()] == [f("dog") for f in zsm.OPENAI_IMAGENET_TEMPLATES]
    timm_wnids = (resources.files("timm") / "data" / "_info" / "imagenet_synsets.txt").read_text().split()
    assert imagenet_wnids() == timm_wnids
    assert len(set(imagenet_wnids())) == 1000 and imagenet_wnids() == sorted(imagenet_wnids())


def _imagenet_folder(root: Path, per_class: dict[str, list[bytes]]) -> None:
    for wnid, images in per_class.items():
        (root / wnid).mkdir(parents=True)
        for i, data in enumerate(images):
            (root / wnid / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(data)


def test_imagenet_folder_reader(tmp_path: Path) -> None:
    wnids = imagenet_wnids()
    root = tmp_path / "imagenet" / "val"
    _imagenet_folder(root, {wnids[0]: [jpeg_bytes(1)], wnids[1]: [jpeg_bytes(2), jpeg_bytes(3)],
                            wnids[999]: [jpeg_bytes(4)]})
    batches, classnames, templates = load_imagefolder(root, image_size=8)
    assert classnames == imagenet_classnames() and classnames[0] == "tench" and len(templates) == 80
    assert templates == imagenet_templates()
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 1, 999]  # standard indices, any subset
    assert imagefolder_set_name(root) == "imagenet"
    (root / "classes.json").write_text(json.dumps({"templates": ["itap of a {c}."]}))
    assert load_imagefolder(root, image_size=8)[2] == ["itap of a {}."]
    # One folder that is not a wnid: plain folder names again, named after the folder.
    (root / "n99999999").mkdir()
    (root / "n99999999" / "a.jpg").write_bytes(jpeg_bytes(5))
    _, names, _ = load_imagefolder(root, image_size=8)
    assert names == [wnids[0], wnids[1], wnids[999], "n99999999"]
    assert imagefolder_set_name(root) == "imagenet_val" and imagefolder_set_name(tmp_path / "imagenet") == "imagenet"


def test_imagenet_zeroshot_against_reference(tmp_path: Path) -> None:
    """1000-way zero-shot with OpenAI's 80 templates vs a float64 brute force; some images are put in the
    folder of their reference prediction, so the expected accuracy is known and not trivial."""
    model = DummyModel(image_size=S, dim=8, seed=3)
    tok = WordTokenizer(context_length=16)
    names, templates, wnids = imagenet_classnames(), imagenet_templates(), imagenet_wnids()
    prompts = ref_text_emb(model, tok, [t.format(c) for c in names for t in templates])
    cls_CD = F.normalize(prompts.view(1000, 80, -1).mean(1), dim=-1)
    jpgs = [jpeg_bytes(300 + i) for i in range(6)]
    imgs = torch.stack([build_transform(S, interpolation="bicubic")(decode_image(b)) for b in jpgs])
    x = prepare_images(imgs, "cpu", torch.float64, mean=SIGLIP, std=SIGLIP)
    emb = F.normalize(x.flatten(1) @ model.image_proj.detach().double(), dim=-1)
    order = torch.argsort(emb @ cls_CD.T, dim=1, descending=True)
    # Images 0-2 go to their top-1 class, 3 to its 3rd choice (a top-5 hit), 4-5 to their 500th (misses).
    targets = [int(order[i, r]) for i, r in enumerate([0, 0, 0, 2, 499, 499])]
    folder: dict[str, list[bytes]] = {}
    for data, t in zip(jpgs, targets):
        folder.setdefault(wnids[t], []).append(data)
    _imagenet_folder(tmp_path / "in", folder)
    cfg = EvalConfig(zeroshot="", retrieval="", compositional="", imagefolder=str(tmp_path / "in"), batch_size=4000)
    out = run_evaluation(EmbeddingScorer(model), tok, cfg, root=tmp_path, image_size=S, device="cpu",
                         interpolation="bicubic", mean=SIGLIP, std=SIGLIP)
    assert out["imagenet/n"] == 6
    assert out["imagenet/top1"] == pytest.approx(100 * 3 / 6)
    assert out["imagenet/top5"] == pytest.approx(100 * 4 / 6)


class RecordingScorer(EmbeddingScorer):
    """Keeps every image batch the evaluators hand to the model."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.seen: list[torch.Tensor] = []

    def image_states(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        self.seen.append(images_BCHW.detach().clone())
        return super().image_states(images_BCHW)


def _expected_rows(blobs: list[bytes], interpolation: str, mean, std) -> list[torch.Tensor]:
    rows = []
    for data in blobs:
        img = build_transform(S, interpolation=interpolation)(decode_image(data))
        rows.append(prepare_images(img[None], "cpu", mean=mean, std=std)[0])
    return rows


def _all_images(root: Path) -> list[bytes]:
    from vlp_core.data.tario import iter_samples

    blobs = [s["jpg"] for url in sorted(root.rglob("*.tar")) for s in iter_samples(str(url)) if "jpg" in s]
    return blobs + [p.read_bytes() for p in sorted(root.rglob("*.jpg"))]


@pytest.mark.parametrize("interpolation,mean,std", [("bicubic", SIGLIP, SIGLIP), ("bilinear", None, None)])
def test_every_eval_path_uses_the_preprocessing(tmp_path: Path, model: DummyModel, tokenizer, interpolation,
                                                 mean, std) -> None:
    write_tiny_eval_sets(tmp_path)
    for c in ("a_b", "c"):
        (tmp_path / "imf" / c).mkdir(parents=True)
        (tmp_path / "imf" / c / "0.jpg").write_bytes(jpeg_bytes(40 + len(c)))
    vision = VisionConfig(image_size=S, interpolation=interpolation)
    if mean is not None:
        vision.image_mean, vision.image_std = mean, std
    cfg = EvalConfig(zeroshot="zeroshot_shape,zeroshot_color", imagefolder=str(tmp_path / "imf"), batch_size=4)
    scorer = RecordingScorer(model)
    out = run_evaluation(scorer, tokenizer, cfg, root=tmp_path, device="cpu", **preprocess_kwargs(vision))
    assert {"imf/top1", "zeroshot_shape/top1", "retrieval/i2t_R@1", "compositional/accuracy"} <= set(out)
    seen = torch.cat(scorer.seen)
    good = [d for d in _all_images(tmp_path) if d != b"broken"]
    want = _expected_rows(good, interpolation, vision.image_mean, vision.image_std)
    assert seen.shape[0] == len(want)
    for row in seen:  # every image the model saw is one of the expected ones, bit for bit
        assert any(torch.equal(row, w) for w in want)
    if interpolation == "bicubic":  # and not what the default preprocessing would have given
        default = _expected_rows(good, "bilinear", [0.48145466, 0.4578275, 0.40821073],
                                 [0.26862954, 0.26130258, 0.27577711])
        assert not any(torch.equal(seen[0], w) for w in default)
        assert seen.min() >= -1 and seen.max() <= 1

    features: list[torch.Tensor] = []

    def feature_fn(images: torch.Tensor) -> torch.Tensor:
        features.append(images)
        return images.flatten(1)[:, :4]

    run_linear_probe(feature_fn, tmp_path / "eval", ["zeroshot_shape"], device="cpu", image_size=S,
                     interpolation=vision.interpolation, mean=vision.image_mean, std=vision.image_std)
    for row in torch.cat(features):
        assert any(torch.equal(row, w) for w in want)


def test_bad_preprocessing_fails_first(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    write_tiny_eval_sets(tmp_path)
    with pytest.raises(ValueError, match="interpolation"):
        run_evaluation(EmbeddingScorer(model), tokenizer, EvalConfig(), root=tmp_path, image_size=S, device="cpu",
                       interpolation="lanczos")
    with pytest.raises(ValueError, match="image_std"):
        run_evaluation(EmbeddingScorer(model), tokenizer, EvalConfig(), root=tmp_path, image_size=S, device="cpu",
                       std=[1.0, 0.0, 1.0])


def test_plain_folder_keeps_folder_names(tmp_path: Path, model: DummyModel, tokenizer) -> None:
    root = tmp_path / "pets"
    for i, c in enumerate(CLASSES[:3]):
        (root / c.replace(" ", "_")).mkdir(parents=True)
        (root / c.replace(" ", "_") / "x.png").write_bytes(jpeg_bytes(i))
    _, names, templates = load_imagefolder(root, image_size=8)
    assert names == sorted(CLASSES[:3]) and templates != imagenet_templates()
    cfg = EvalConfig(zeroshot="", retrieval="", compositional="", imagefolder=str(root))
    out = run_evaluation(EmbeddingScorer(model), tokenizer, cfg, root=tmp_path, image_size=S, device="cpu")
    assert set(out) == {"pets/top1", "pets/n", "pets/skipped"} and out["pets/n"] == 3
    assert np.isfinite(out["pets/top1"])
