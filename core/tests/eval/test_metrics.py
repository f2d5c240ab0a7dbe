"""Chunked ranking / top-k code against brute-force full-matrix references (float64, exact fractions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vlp_eval_testutils import ref_recall

from vlp_core.eval.retrieval import expected_hits, rank_counts, retrieval_metrics_from_states
from vlp_core.eval.zeroshot import topk_hits


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.T


def _varying_c2i(n_images: int, seed: int) -> torch.Tensor:
    """Caption owners with 0..4 captions per image, shuffled so captions of one image are not adjacent."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 5, size=n_images)
    counts[0] = 0
    counts[1] = 4
    owners = np.repeat(np.arange(n_images), counts)
    return torch.from_numpy(rng.permutation(owners))


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_retrieval_random_states_match_full_matrix(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    N, D = 23, 6
    c2i = _varying_c2i(N, seed=1)
    img = torch.randn(N, D, generator=g, dtype=torch.float64)
    txt = torch.randn(c2i.shape[0], D, generator=g, dtype=torch.float64)
    got = retrieval_metrics_from_states(img, txt, c2i, dot, chunk_size=chunk)
    want = ref_recall((img @ txt.T).numpy(), c2i.numpy())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["n_images"] == int((torch.bincount(c2i, minlength=N) > 0).sum())
    assert got["n_texts"] == c2i.shape[0]


def test_no_ties_recall_equals_sorted_position() -> None:
    # Independent of the tie formula: without ties, rank = position of the first correct item after sorting.
    g = torch.Generator().manual_seed(3)
    N, D = 17, 5
    c2i = _varying_c2i(N, seed=4)
    img, txt = torch.randn(N, D, generator=g), torch.randn(c2i.shape[0], D, generator=g)
    scores = (img.double() @ txt.double().T).numpy()
    got = retrieval_metrics_from_states(img, txt, c2i, dot, chunk_size=3)
    owners = c2i.numpy()
    for k in (1, 5, 10):
        i2t = [int(np.nonzero(owners[np.argsort(-scores[n])] == n)[0][0]) < k for n in set(owners.tolist())]
        t2i = [int(np.nonzero(np.argsort(-scores[:, m]) == owners[m])[0][0]) < k for m in range(len(owners))]
        assert got[f"i2t_R@{k}"] == pytest.approx(100 * np.mean(i2t), abs=1e-4)
        assert got[f"t2i_R@{k}"] == pytest.approx(100 * np.mean(t2i), abs=1e-4)


@pytest.mark.parametrize("chunk", [2, 5, 1000])
def test_retrieval_with_many_ties_matches_reference(chunk: int) -> None:
    # Entries in {-1, 0, 1}: integer scores, exact in float32, with ties everywhere (also among an image's
    # own captions, which must not count against it).
    g = torch.Generator().manual_seed(5)
    N, D = 19, 2
    c2i = _varying_c2i(N, seed=6)
    img = torch.randint(-1, 2, (N, D), generator=g).float()
    txt = torch.randint(-1, 2, (c2i.shape[0], D), generator=g).float()
    got = retrieval_metrics_from_states(img, txt, c2i, dot, chunk_size=chunk)
    want = ref_recall((img.double() @ txt.double().T).numpy(), c2i.numpy())
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < got["t2i_R@1"] < 100


def test_all_equal_scores_give_chance_level() -> None:
    N, M = 12, 12
    img, txt = torch.zeros(N, 4), torch.zeros(M, 4)
    got = retrieval_metrics_from_states(img, txt, torch.arange(M), dot, chunk_size=5)
    for k in (1, 5, 10):
        assert got[f"t2i_R@{k}"] == pytest.approx(100 * k / N)
        assert got[f"i2t_R@{k}"] == pytest.approx(100 * k / M)


def test_expected_hits_hypergeometric_case() -> None:
    # 1 strictly greater, 3 wrong and 2 correct tied, k = 3 -> 2 slots: 1 - C(3,2)/C(5,2) = 1 - 3/10.
    hit = expected_hits(torch.tensor([1]), torch.tensor([3]), torch.tensor([2]), k=3)
    assert hit.item() == pytest.approx(0.7)
    assert expected_hits(torch.tensor([3]), torch.tensor([0]), torch.tensor([1]), k=3).item() == 0.0


def test_rank_counts_custom_score_fn_orientation() -> None:
    # An asymmetric score function: queries must be the rows.
    q, c = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [5.0], [1.0]])
    fn = lambda a, b: a - b.T  # noqa: E731
    greater, tw, tr = rank_counts(q, torch.tensor([0, 1]), c, torch.tensor([0, 1, 2]), fn, chunk_size=2)
    # query 0 (1.0): correct cand 0 -> 1.0; others -4, 0 -> rank 0. query 1 (2.0): correct -> -3; others 2, 1.
    assert greater.tolist() == [0, 2]
    assert tw.tolist() == [0, 0] and tr.tolist() == [1, 1]


def test_caption_index_out_of_range_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics_from_states(torch.zeros(2, 3), torch.zeros(1, 3), torch.tensor([2]), dot)


def test_topk_hits_against_reference() -> None:
    g = torch.Generator().manual_seed(7)
    B, C = 40, 9
    scores = torch.randint(0, 4, (B, C), generator=g).float()  # heavy ties
    labels = torch.randint(0, C, (B,), generator=g)
    got = topk_hits(scores, labels, [1, 5])
    for b in range(B):
        true = scores[b, labels[b]].item()
        g_ = int((scores[b] > true).sum())
        t = int((scores[b] == true).sum()) - 1
        for j, k in enumerate((1, 5)):
            # Enumerate every position of the true class within its tie group (uniform).
            want = np.mean([g_ + pos < k for pos in range(t + 1)])
            assert got[j, b].item() == pytest.approx(want)
