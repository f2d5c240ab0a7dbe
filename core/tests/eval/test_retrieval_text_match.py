"""Retrieval matched by caption text (``match="text"``): identical caption strings are one text, correct for every
image holding it. Checked against plain-Python loops over a score matrix the test controls, and against the
index-based retrieval when no text repeats.

Shape legend:
    N: images    U: unique texts    M: captions    S: image side
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from vlp_eval_testutils import DummyModel, fair_hit, ref_image_emb, ref_text_emb

from vlp_core.config import EvalConfig
from vlp_core.data.synthetic import generate_world
from vlp_core.data.tario import iter_samples
from vlp_core.eval import EmbeddingScorer, retrieval_eval, retrieval_metrics_from_states, run_evaluation

S = 8
KS = (1, 5)

# Eight images and their captions: "red star" belongs to 3 images, "blue circle" to 2, "green cross" to 2.
CAPTIONS = [
    ["red star", "blue circle"],
    ["red star"],
    ["green cross", "red star", "white square"],
    ["blue circle", "cyan hexagon"],
    ["green cross"],
    ["orange triangle", "purple star"],
    ["yellow cross"],
    ["purple circle", "orange square"],
]
TEXTS = list(dict.fromkeys(c for caps in CAPTIONS for c in caps))  # unique, first-occurrence order


class TableScorer:
    """Scores read from a hand-made table ``scores_NU[image, text]``: an image's state is its id (its pixel
    value, read back with mean 0 and std 1), a text's state its row in ``texts`` (the fake tokenizer's id)."""

    def __init__(self, scores_NU: torch.Tensor) -> None:
        self.scores_NU = scores_NU

    def image_states(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return (images_BCHW[:, 0, 0, 0].float() * 255).round().long()

    def text_states(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return tokens_BL[:, 0]

    def class_states(self, tokens_CTL: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, image_states: torch.Tensor, text_states: torch.Tensor) -> torch.Tensor:
        return self.scores_NU[image_states][:, text_states]


def _table_tokenizer(texts: list[str]):
    def tokenize(batch: list[str]) -> torch.Tensor:
        return torch.tensor([[texts.index(t)] for t in batch], dtype=torch.long)

    return tokenize


def _image_batches(n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Image ``i`` is a uint8 image filled with the value ``i`` (so the scorer can read its id back)."""
    ids = torch.arange(n)
    images = ids.view(-1, 1, 1, 1).expand(n, 3, S, S).to(torch.uint8)
    return [(images[i : i + batch], ids[i : i + batch]) for i in range(0, n, batch)]


def _run(scores_NU: torch.Tensor, captions: list[list[str]], texts: list[str], match: str, chunk: int):
    flat = [c for caps in captions for c in caps]
    c2i = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    return retrieval_eval(
        TableScorer(scores_NU), _image_batches(len(captions), 3), flat, c2i, _table_tokenizer(texts),
        device="cpu", batch_size=2, chunk_size=chunk, ks=KS, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        match=match,  # type: ignore[arg-type]
    )


def _fair_recall(scores_QP: np.ndarray, right_QP: np.ndarray, k: int) -> float:
    """Mean fair hit@k (percent) over the rows: candidates strictly above the best correct one, then a
    random order of the ties at its score (exact fractions)."""
    total = Fraction(0)
    for row, right in zip(scores_QP, right_QP):
        best = row[right].max()
        greater = int((row > best).sum())
        tr, tw = int((row[right] == best).sum()), int((row[~right] == best).sum())
        total += fair_hit(greater, tw, tr, k)
    return 100 * float(total) / len(scores_QP)


def reference_text_match(
    scores_NU: np.ndarray, captions: list[list[str]], texts: list[str], ks: tuple[int, ...] = KS
) -> dict[str, float]:
    """Plain loops: i2t over the images with a caption (correct: a text among the image's captions), t2i
    over the unique texts (correct: an image holding the text); ties broken fairly."""
    right_NU = np.array([[t in caps for t in texts] for caps in captions], dtype=bool)
    queries = right_NU.any(axis=1)
    out = {f"i2t_R@{k}": _fair_recall(scores_NU[queries], right_NU[queries], k) for k in ks}
    out |= {f"t2i_R@{k}": _fair_recall(scores_NU.T, right_NU.T, k) for k in ks}
    out["mean_recall"] = float(np.mean(list(out.values())))
    out["n_images"], out["n_texts"] = float(queries.sum()), float(len(texts))
    return out


def test_hand_checked_hit_by_text() -> None:
    # Two images share the caption "x"; image 1 scores it higher. By image, image 0's caption "x" misses at
    # R@1 (image 1 comes first); by text, "x" hits (image 1 holds "x" too).
    scores_NU = torch.tensor([[0.5, 0.1], [0.9, 0.0], [0.2, 0.8]])
    captions, texts = [["x"], ["x"], ["y"]], ["x", "y"]
    by_text = _run(scores_NU, captions, texts, "text", chunk=2)
    assert by_text["t2i_R@1"] == 100.0 and by_text["i2t_R@1"] == 100.0 and by_text["n_texts"] == 2
    by_image = _run(scores_NU, captions, texts, "image", chunk=2)
    # Captions "x"(0), "x"(1), "y"(2): t2i hits 0/1/1; i2t: image 0's best caption ties with image 1's copy.
    assert by_image["t2i_R@1"] == pytest.approx(200 / 3) and by_image["n_texts"] == 3
    assert by_image["i2t_R@1"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_text_match_equals_reference_loop(ties: bool, chunk: int) -> None:
    rng = np.random.default_rng(1)
    N, U = len(CAPTIONS), len(TEXTS)
    # Distinct scores (a permutation), or three levels with ties everywhere (also among correct texts).
    scores = rng.permutation(N * U).reshape(N, U) if not ties else rng.integers(0, 3, size=(N, U))
    scores_NU = torch.tensor(scores, dtype=torch.float32)
    got = _run(scores_NU, CAPTIONS, TEXTS, "text", chunk)
    want = reference_text_match(scores.astype(np.float64), CAPTIONS, TEXTS)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert all(0 < got[f"{d}_R@{k}"] < 100 for d in ("i2t", "t2i") for k in KS)  # neither trivial nor empty
    assert got["n_texts"] == 10 < sum(map(len, CAPTIONS)) == 14  # 10 unique texts of 14 captions
    if not ties:  # independent of the tie formula: the first correct item after sorting is within the top k
        for k in KS:
            i2t = [next(i for i, u in enumerate(np.argsort(-scores[n])) if TEXTS[u] in CAPTIONS[n]) < k
                   for n in range(N)]
            t2i = [next(i for i, n in enumerate(np.argsort(-scores[:, u])) if TEXTS[u] in CAPTIONS[n]) < k
                   for u in range(U)]
            assert got[f"i2t_R@{k}"] == pytest.approx(100 * np.mean(i2t))
            assert got[f"t2i_R@{k}"] == pytest.approx(100 * np.mean(t2i))


def test_without_duplicates_text_match_equals_index_match() -> None:
    g = torch.Generator().manual_seed(0)
    captions = [[f"cap {i} {j}" for j in range(i % 3)] for i in range(9)]  # 0-2 captions, all distinct
    texts = [c for caps in captions for c in caps]
    scores_NU = torch.randint(0, 4, (9, len(texts)), generator=g).float()  # with ties
    by_text = _run(scores_NU, captions, texts, "text", chunk=4)
    by_image = _run(scores_NU, captions, texts, "image", chunk=4)
    assert by_text == by_image
    assert by_text["n_images"] == 6 and by_text["n_texts"] == len(texts)


@pytest.mark.parametrize("chunk", [2, 5, 1000])
def test_states_with_identity_text_map_equal_index_match(chunk: int) -> None:
    g = torch.Generator().manual_seed(5)
    N, M = 13, 30
    c2i = torch.randint(0, N, (M,), generator=g)
    img = torch.randint(-1, 2, (N, 2), generator=g).float()
    txt = torch.randint(-1, 2, (M, 2), generator=g).float()
    dot = lambda a, b: a @ b.T  # noqa: E731
    plain = retrieval_metrics_from_states(img, txt, c2i, dot, chunk_size=chunk)
    ident = torch.arange(M)
    by_text = retrieval_metrics_from_states(img, txt, c2i, dot, caption_to_text_M=ident, chunk_size=chunk)
    assert by_text == plain


def test_states_text_map_is_validated() -> None:
    dot = lambda a, b: a @ b.T  # noqa: E731
    img, txt = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="outside the 2 texts"):
        retrieval_metrics_from_states(img, txt, torch.tensor([0, 1]), dot, caption_to_text_M=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="caption_to_text has 1 captions"):
        retrieval_metrics_from_states(img, txt, torch.tensor([0, 1]), dot, caption_to_text_M=torch.tensor([0]))
    with pytest.raises(ValueError, match="'image' or 'text'"):
        _run(torch.zeros(1, 1), [["a"]], ["a"], "caption", chunk=2)


def test_generated_retrieval_multi_through_run_evaluation(tmp_path: Path, tokenizer) -> None:
    sizes = dict.fromkeys(("zeroshot_shape", "zeroshot_color", "zeroshot_color_shape", "retrieval",
                           "compositional", "retrieval_long"), 0)
    root = generate_world(tmp_path / "w", train_samples=10, docs=0, eval_sizes={**sizes, "retrieval_multi": 40},
                          progress=False)
    folder = root / "eval" / "retrieval_multi"
    assert json.loads((folder / "set.json").read_text()) == {"match": "text"}
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["retrieval_multi"]
    samples = [s for url in sorted(folder.glob("*.tar")) for s in iter_samples(str(url))]
    captions = [json.loads(s["json"])["captions"] for s in samples]
    texts = list(dict.fromkeys(c for caps in captions for c in caps))
    assert len(samples) == 40 and len(texts) < sum(map(len, captions))  # texts repeat across images

    model = DummyModel(image_size=64, dim=8, seed=2)
    cfg = EvalConfig(retrieval="retrieval_multi", zeroshot="", compositional="", batch_size=16)
    out = run_evaluation(EmbeddingScorer(model), tokenizer, cfg, root=root, image_size=64, device="cpu",
                         log=lambda s: None)
    img = ref_image_emb(model, [s["jpg"] for s in samples], 64)
    txt = ref_text_emb(model, tokenizer, texts)
    want = reference_text_match((img @ txt.T).numpy(), captions, texts, ks=(1, 5, 10))
    for key, value in want.items():
        assert out[f"retrieval_multi/{key}"] == pytest.approx(value, abs=1e-6), key
    assert out["retrieval_multi/n_images"] == 40 and out["retrieval_multi/n_texts"] == len(texts)
    assert out["retrieval_multi/skipped"] == 0
