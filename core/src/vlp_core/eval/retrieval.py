"""Image-text retrieval recall (R@K both ways) in memory linear in the data set size.

Shape legend:
    N: images    M: captions    T: text rows (M, or the unique caption texts when matching by text)
    B: batch    D: state width (any trailing shape)    K: (query, correct candidate) pairs
    Q: queries   P: candidates (of one direction: images->captions or captions->images)
    H, W: image height and width

Definition. For a query, ``best`` is the highest score among its correct candidates (an image's own
captions; a caption's one image). The rank is the number of candidates scoring strictly higher than
``best``; R@K is the fraction of queries with rank < K.

Ties are counted fairly: the hit is the probability that, in a uniformly random order of the candidates
tied at ``best`` (``tw`` wrong, ``tr >= 1`` correct), a correct one lands within the first ``K - g``
places (``g`` = strictly greater). That is ``1 - C(tw, K-g) / C(tw+tr, K-g)`` for ``K > g``, else 0. A
collapsed model with all scores equal thus gets chance level, not a perfect score.

Matching by text (``match="text"``, for sets where one caption text belongs to several images, such as the
shapes world's ``retrieval_multi``): identical caption strings become one text, encoded once. Text -> image
is correct when the image holds a caption with that text (a text may have several correct images);
image -> text when the text is one of the image's captions. The queries are the images with a caption and
the unique texts (``n_texts``). With all texts distinct this gives the numbers of matching by caption.

Memory. The N x M matrix is never built: scores are computed in ``chunk x chunk`` blocks, twice per query
chunk (once for ``best``, once for the counts) so both passes compare the very same float values. States
are encoded per rank (images: the reader's share; captions or texts: a contiguous block), all-gathered, each rank
scores a contiguous block of queries, and the hit sums are all-reduced: every rank gets the same result.
Matching by text keeps the correct (query, candidate) pairs as sorted keys (``O(M)``) and builds each
block's ``chunk x chunk`` mask of correct candidates from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch

from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD, prepare_images
from vlp_core.eval.datasets import iter_image_batches
from vlp_core.eval.scorer import (
    ScoreFn,
    all_gather_rows,
    all_reduce_sum,
    autocast_for,
    dist_rank_world,
    evaluating,
    share_bounds,
    to_float,
)
from vlp_core.method import Scorer

__all__ = ["retrieval_eval", "retrieval_metrics_from_states", "rank_counts", "expected_hits"]

Tokenizer = Callable[[list[str]], torch.Tensor]
# ``(query ids [B], p0, p1) -> bool [B, p1 - p0]``: which of candidates ``p0..p1`` are correct per query.
OwnFn = Callable[[torch.Tensor, int, int], torch.Tensor]
KS: tuple[int, ...] = (1, 5, 10)


def _group_own(query_group: torch.Tensor, cand_group_P: torch.Tensor) -> OwnFn:
    """Correct when the query's group (indexed by query id) equals the candidate's."""

    def own(ids_B: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
        return query_group[ids_B].view(-1, 1) == cand_group_P[p0:p1].view(1, -1)

    return own


def _pair_own(pair_keys_K: torch.Tensor, num_cands: int) -> OwnFn:
    """Correct when ``query_id * num_cands + cand_id`` is among the sorted ``pair_keys_K`` (a sparse
    relation: a query may have several correct candidates and a candidate several queries)."""

    def own(ids_B: torch.Tensor, p0: int, p1: int) -> torch.Tensor:
        cands_P = torch.arange(p0, p1, device=pair_keys_K.device)
        keys_BP = ids_B.view(-1, 1) * num_cands + cands_P.view(1, -1)
        if pair_keys_K.numel() == 0:
            return torch.zeros_like(keys_BP, dtype=torch.bool)
        pos_BP = torch.searchsorted(pair_keys_K, keys_BP).clamp(max=pair_keys_K.numel() - 1)
        return pair_keys_K[pos_BP] == keys_BP

    return own


def _rank_counts(
    query_states_Q: torch.Tensor,
    query_ids_Q: torch.Tensor,
    cand_states_P: torch.Tensor,
    own_fn: OwnFn,
    score_fn: ScoreFn,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`rank_counts` with correctness given by ``own_fn`` on the queries' ids ``query_ids_Q``."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    Q, P = query_states_Q.shape[0], cand_states_P.shape[0]
    device = query_ids_Q.device
    greater_Q = torch.zeros(Q, dtype=torch.long, device=device)
    ties_wrong_Q = torch.zeros_like(greater_Q)
    ties_right_Q = torch.zeros_like(greater_Q)
    for q0 in range(0, Q, chunk_size):
        q_states = query_states_Q[q0 : q0 + chunk_size]
        q_ids_B = query_ids_Q[q0 : q0 + chunk_size]
        best_B: torch.Tensor | None = None
        for p0 in range(0, P, chunk_size):
            p1 = min(P, p0 + chunk_size)
            scores_BP = score_fn(q_states, cand_states_P[p0:p1])
            own_BP = own_fn(q_ids_B, p0, p1)
            block_best_B = scores_BP.masked_fill(~own_BP, float("-inf")).amax(dim=1)
            best_B = block_best_B if best_B is None else torch.maximum(best_B, block_best_B)
        if best_B is None:  # no candidates at all
            continue
        best_B1 = best_B.view(-1, 1)
        for p0 in range(0, P, chunk_size):
            p1 = min(P, p0 + chunk_size)
            # Recomputed, not cached: caching would hold B x P scores; the same inputs give the same floats.
            scores_BP = score_fn(q_states, cand_states_P[p0:p1])
            own_BP = own_fn(q_ids_B, p0, p1)
            tied_BP = scores_BP == best_B1
            greater_Q[q0 : q0 + chunk_size] += (scores_BP > best_B1).sum(dim=1)
            ties_wrong_Q[q0 : q0 + chunk_size] += (tied_BP & ~own_BP).sum(dim=1)
            ties_right_Q[q0 : q0 + chunk_size] += (tied_BP & own_BP).sum(dim=1)
    return greater_Q, ties_wrong_Q, ties_right_Q


def rank_counts(
    query_states_Q: torch.Tensor,
    query_group_Q: torch.Tensor,
    cand_states_P: torch.Tensor,
    cand_group_P: torch.Tensor,
    score_fn: ScoreFn,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query: candidates strictly above its best correct score, and wrong/correct ones tied with it.

    A candidate is correct for a query when their groups are equal.

    Returns:
        ``(greater_Q, ties_wrong_Q, ties_right_Q)`` int64; ``ties_right`` is 0 only for a query without
        any correct candidate (or a NaN best score).
    """
    query_ids_Q = torch.arange(query_states_Q.shape[0], device=query_group_Q.device)
    own = _group_own(query_group_Q, cand_group_P)
    return _rank_counts(query_states_Q, query_ids_Q, cand_states_P, own, score_fn, chunk_size)


def expected_hits(
    greater_Q: torch.Tensor, ties_wrong_Q: torch.Tensor, ties_right_Q: torch.Tensor, k: int
) -> torch.Tensor:
    """Probability ``[Q]`` (float64) that a correct candidate is in the top ``k`` under fair tie-breaking.

    ``1 - C(tw, k') / C(tw + tr, k')`` with ``k' = k - greater``: the chance that the first ``k'`` of the
    randomly ordered tied candidates are all wrong, complemented.
    """
    slots_Q = k - greater_Q
    tw, tr = ties_wrong_Q.double(), ties_right_Q.double()
    all_wrong_Q = torch.ones_like(tw)
    for i in range(k):
        # Once i reaches tw the numerator is 0 and the product stays 0; the clamps only keep later
        # (already irrelevant) factors finite.
        factor = (tw - i).clamp(min=0) / (tw + tr - i).clamp(min=1)
        all_wrong_Q = torch.where(slots_Q > i, all_wrong_Q * factor, all_wrong_Q)
    hit_Q = torch.where(slots_Q > 0, 1.0 - all_wrong_Q, torch.zeros_like(all_wrong_Q))
    # A query with no correct candidate (tr == 0) can never hit.
    return torch.where(ties_right_Q > 0, hit_Q, torch.zeros_like(hit_Q))


def _share_hits(
    query_idx_Q: torch.Tensor,
    query_states: torch.Tensor,
    cand_states: torch.Tensor,
    own_fn: OwnFn,
    score_fn: ScoreFn,
    ks: Sequence[int],
    chunk_size: int,
) -> torch.Tensor:
    """Summed expected hits ``[len(ks)]`` (float64) over this rank's contiguous block of the queries.

    ``query_idx_Q`` are the queries' rows of ``query_states``, also the ids ``own_fn`` is called with.
    """
    rank, world = dist_rank_world()
    start, stop = share_bounds(query_idx_Q.shape[0], rank, world)
    idx = query_idx_Q[start:stop]
    counts = _rank_counts(query_states[idx], idx, cand_states, own_fn, score_fn, chunk_size)
    hits = [expected_hits(*counts, k=k).sum() for k in ks]
    return torch.stack(hits) if hits else torch.zeros(0, dtype=torch.float64, device=query_idx_Q.device)


def retrieval_metrics_from_states(
    image_states_N: torch.Tensor,
    text_states_T: torch.Tensor,
    caption_to_image_M: torch.Tensor,
    score_fn: ScoreFn,
    *,
    caption_to_text_M: torch.Tensor | None = None,
    ks: Sequence[int] = KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@K in percent from precomputed states (identical on all ranks; each scores a share).

    Args:
        image_states_N: Image states, row ``n`` = image ``n``.
        text_states_T: Text states: one row per caption (``T == M``), or per text with ``caption_to_text_M``.
        caption_to_image_M: Image index (row of ``image_states_N``) of each caption.
        score_fn: ``(image_states, text_states) -> [Bi, Bt]``, e.g. ``scorer.score``.
        caption_to_text_M: Match by text: the text row (of ``text_states_T``) of each caption. A text is
            correct for every image one of its captions belongs to. ``None``: caption ``m`` is row ``m``
            and is correct for its one image only.
        ks: Recall cut-offs.
        chunk_size: Side of the score blocks.

    Returns:
        ``i2t_R@K``, ``t2i_R@K``, ``mean_recall`` (mean of all of them), ``n_images`` (images with at least
        one caption: the i2t queries) and ``n_texts`` (the t2i queries: captions, or texts with at least
        one caption when matching by text).
    """
    N, T, M = image_states_N.shape[0], text_states_T.shape[0], caption_to_image_M.shape[0]
    device = caption_to_image_M.device
    if M and (int(caption_to_image_M.min()) < 0 or int(caption_to_image_M.max()) >= N):
        raise ValueError(f"caption_to_image holds indices outside the {N} images")
    image_ids_N = torch.arange(N, device=device)
    # Images without captions stay as t2i distractors but cannot be i2t queries (no correct answer).
    has_caption_N = torch.zeros(N, dtype=torch.bool, device=device)
    has_caption_N[caption_to_image_M] = True
    i2t_queries = image_ids_N[has_caption_N]
    if caption_to_text_M is None:
        if T != M:
            raise ValueError(f"{T} text states but caption_to_image has {M} captions")
        t2i_queries = torch.arange(M, device=device)
        i2t_own = _group_own(image_ids_N, caption_to_image_M)
        t2i_own = _group_own(caption_to_image_M, image_ids_N)
    else:
        c2t_M = caption_to_text_M.to(device)
        if c2t_M.shape != caption_to_image_M.shape:
            raise ValueError(f"caption_to_text has {c2t_M.shape[0]} captions but caption_to_image has {M}")
        if M and (int(c2t_M.min()) < 0 or int(c2t_M.max()) >= T):
            raise ValueError(f"caption_to_text holds indices outside the {T} texts")
        # Likewise texts without captions stay as i2t distractors only.
        has_caption_T = torch.zeros(T, dtype=torch.bool, device=device)
        has_caption_T[c2t_M] = True
        t2i_queries = torch.arange(T, device=device)[has_caption_T]
        # Sorted unique (query, candidate) keys of the correct pairs: O(M) memory, looked up per block.
        i2t_own = _pair_own(torch.unique(caption_to_image_M * T + c2t_M), T)
        t2i_own = _pair_own(torch.unique(c2t_M * N + caption_to_image_M), N)
    i2t = _share_hits(i2t_queries, image_states_N, text_states_T, i2t_own, score_fn, ks, chunk_size)

    def t2i_score(text_states: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        return score_fn(image_states, text_states).T

    t2i = _share_hits(t2i_queries, text_states_T, image_states_N, t2i_own, t2i_score, ks, chunk_size)
    hits = all_reduce_sum(torch.cat([i2t, t2i]))
    n_i2t, n_t2i = int(i2t_queries.shape[0]), int(t2i_queries.shape[0])
    out: dict[str, float] = {}
    for j, k in enumerate(ks):
        out[f"i2t_R@{k}"] = 100.0 * float(hits[j]) / n_i2t if n_i2t else float("nan")
    for j, k in enumerate(ks):
        out[f"t2i_R@{k}"] = 100.0 * float(hits[len(ks) + j]) / n_t2i if n_t2i else float("nan")
    recalls = [v for key, v in out.items() if "_R@" in key]
    out["mean_recall"] = sum(recalls) / len(recalls) if recalls else float("nan")
    out["n_images"] = float(n_i2t)
    out["n_texts"] = float(n_t2i)
    return out


def retrieval_eval(
    scorer: Scorer,
    images: Iterable[tuple[torch.Tensor, torch.Tensor]],
    captions: list[str],
    caption_to_image: torch.Tensor,
    tokenizer: Tokenizer,
    *,
    device: torch.device | str,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1024,
    ks: Sequence[int] = KS,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    match: Literal["image", "text"] = "image",
) -> dict[str, float]:
    """Image<->text Recall@K of ``scorer``; sharded over ranks when a process group is initialised.

    Args:
        scorer: Any :class:`vlp_core.method.Scorer`.
        images: This rank's batches ``(images_uint8_BCHW, image_ids_B)``; ids are global and unique.
        captions: All captions (the same list on every rank).
        caption_to_image: LongTensor ``[M]``: the image id of each caption. Captions whose image never
            arrives (skipped as undecodable on every rank) are left out of the evaluation.
        tokenizer: ``list[str] -> LongTensor [B, L]``.
        device: Where states and scores live.
        batch_size: Largest image batch and caption batch.
        dtype: ``torch.bfloat16``/``float16`` run the towers under autocast.
        chunk_size: Side of the score blocks.
        ks: Recall cut-offs.
        mean, std: Per-channel image statistics in [0, 1] units (``model.vision.image_mean``/``image_std``).
        match: ``"image"``: a caption is correct for its own image. ``"text"``: identical caption strings
            are one text, encoded once, correct for every image holding it (see the module docstring).

    Returns:
        See :func:`retrieval_metrics_from_states`.
    """
    device = torch.device(device)
    if match not in ("image", "text"):
        raise ValueError(f"retrieval match must be 'image' or 'text', got {match!r}")
    if len(captions) != caption_to_image.shape[0]:
        raise ValueError(f"{len(captions)} captions but caption_to_image has {caption_to_image.shape[0]}")
    with evaluating(scorer):
        states, ids = [], []
        for images_BCHW, ids_B in iter_image_batches(images, batch_size):
            with autocast_for(device, dtype):
                images = prepare_images(images_BCHW, device, mean=mean, std=std)
                states.append(to_float(scorer.image_states(images)))
            ids.append(ids_B.to(device))
        image_states = all_gather_rows(torch.cat(states) if states else None, device)
        image_ids = all_gather_rows(torch.cat(ids) if ids else None, device)
        if image_states is None or image_ids is None:
            nan = float("nan")
            return {
                **{f"{d}_R@{k}": nan for d in ("i2t", "t2i") for k in ks},
                "mean_recall": nan,
                "n_images": 0.0,
                "n_texts": 0.0,
            }
        # Rows in id order, so a caption's image is found by binary search on the sorted ids.
        image_ids, order = image_ids.sort()
        image_states = image_states[order]
        if image_ids.shape[0] > 1 and bool((image_ids[1:] == image_ids[:-1]).any()):
            raise ValueError("image ids are not unique across ranks (readers must split the set disjointly)")
        c2i = caption_to_image.to(device)
        pos_M = torch.searchsorted(image_ids, c2i).clamp(max=image_ids.shape[0] - 1)
        present_M = image_ids[pos_M] == c2i
        kept = present_M.nonzero().view(-1).tolist()
        kept_captions = [captions[m] for m in kept]
        caption_to_row = pos_M[present_M]
        texts, caption_to_text = kept_captions, None
        if match == "text":
            # First-occurrence order: the same texts and rows on every rank (captions are global).
            texts = list(dict.fromkeys(kept_captions))
            row_of = {t: i for i, t in enumerate(texts)}
            caption_to_text = torch.tensor([row_of[c] for c in kept_captions], dtype=torch.long, device=device)

        rank, world = dist_rank_world()
        start, stop = share_bounds(len(texts), rank, world)
        text_parts = []
        for t0 in range(start, stop, batch_size):
            tokens_BL = tokenizer(texts[t0 : min(stop, t0 + batch_size)]).to(device)
            with autocast_for(device, dtype):
                text_parts.append(to_float(scorer.text_states(tokens_BL)))
        text_states = all_gather_rows(torch.cat(text_parts) if text_parts else None, device)
        if text_states is None:  # no caption survived: only the image side can be described
            text_states = image_states[:0]
        return retrieval_metrics_from_states(
            image_states, text_states, caption_to_row, scorer.score, caption_to_text_M=caption_to_text, ks=ks,
            chunk_size=chunk_size,
        )
