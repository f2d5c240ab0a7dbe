"""The adapter's sequences against plain-loop references: spans, labels, flags, filters, truncation, mixing."""

from __future__ import annotations

import pytest
import torch
from helpers import SENTENCES, document, pair, tiny_cfg
from vlp_lcl import METHOD, LclModel
from vlp_lcl.data import IGNORE, SpecialIds, assemble

from vlp_core.data.wds import WdsPipeline, parse_sources
from vlp_core.method import SkipSample


def _adapter(tokenizer, context_length=96, **loss):
    cfg = tiny_cfg(context_length)
    for k, v in loss.items():
        setattr(cfg.loss, k, v)
    return METHOD.build_adapter(cfg, tokenizer), cfg


def _spans(row: list[int], ids: SpecialIds, P: int) -> list[int]:
    """Start positions of image spans, checking each is exactly <soi> <img> x P <eoi> (plain loop)."""
    starts = []
    for t, tok in enumerate(row):
        if tok == ids.soi:
            assert row[t + 1 : t + 1 + P] == [ids.img] * P and row[t + 1 + P] == ids.eoi
            starts.append(t)
    assert row.count(ids.img) == P * len(starts) and row.count(ids.eoi) == len(starts)
    return starts


def test_pair_layouts_and_context_flag(tokenizer) -> None:
    adapter, _ = _adapter(tokenizer)
    ids, P = adapter.ids, adapter.P
    text = adapter.encode("a red circle at the top left.")
    seen = set()
    for seed in range(40):
        out = adapter(pair(seed))
        row = out["ids"]
        if row[0] == ids.soi:  # image-first: captioning, no context
            assert row == [ids.soi] + [ids.img] * P + [ids.eoi] + text + [ids.eot]
            assert out["has_context"] == [False]
            seen.add("image_first")
        else:
            assert row == [ids.bos] + text + [ids.soi] + [ids.img] * P + [ids.eoi]
            assert out["has_context"] == [True]
            seen.add("text_first")
    assert seen == {"image_first", "text_first"}
    always, _ = _adapter(tokenizer, img_first_prob=1.0)
    assert all(always(pair(s))["has_context"] == [False] for s in range(5))


def test_document_rules(tokenizer) -> None:
    adapter, _ = _adapter(tokenizer, context_length=512)
    ids, P = adapter.ids, adapter.P
    # sentence 1 twice (one kept), a low-similarity image on 2 (dropped), a missing member on 3 (dropped).
    sample = document(3, SENTENCES[:6], [(1, 0.3), (0, 0.9), (1, 0.5), (2, 0.1), (4, 0.3)])
    sample["json"] = sample["json"].replace(b'"img4.jpg"', b'"absent.jpg"')
    out = adapter(sample)
    row = out["ids"]
    assert row[0] == ids.bos and row[-1] == ids.eot
    starts = _spans(row, ids, P)
    assert len(starts) == len(out["images"]) == 2  # sentences 0 and 1 keep one image each
    # The text is the six sentences in order, with nothing else in between.
    text = [t for t in row[1:-1] if t not in (ids.soi, ids.img, ids.eoi)]
    assert text == [t for s in SENTENCES[:6] for t in adapter.encode(s)]
    # Each image sits right before or right after its sentence.
    bounds = [len(adapter.encode(s)) for s in SENTENCES[:6]]
    text_before = [sum(1 for t in row[:st] if t not in (ids.soi, ids.img, ids.eoi, ids.bos)) for st in starts]
    cum = [0]
    for n in bounds:
        cum.append(cum[-1] + n)
    for matched, before in zip((0, 1), text_before):
        assert before in (cum[matched], cum[matched + 1])
    assert out["has_context"] == [b >= 1 for b in text_before]


def test_document_image_cap_and_truncation(tokenizer) -> None:
    adapter, _ = _adapter(tokenizer, context_length=512)
    ids, P = adapter.ids, adapter.P
    many = document(5, SENTENCES, [(i, 1.0) for i in range(8)])
    assert len(adapter(many)["images"]) == 6  # at most max_images
    for ctx in range(12, 60):
        short, _ = _adapter(tokenizer, context_length=ctx)
        try:
            out = short(document(7, SENTENCES, [(i, 1.0) for i in range(8)]))
        except SkipSample as e:
            assert e.reason == "too_few_images"
            continue
        row = out["ids"]
        assert len(row) <= ctx and row[-1] == ids.eot
        assert len(_spans(row, ids, P)) == len(out["images"]) >= 1  # never a cut span


def test_special_token_strings_are_neutralised(tokenizer) -> None:
    adapter, _ = _adapter(tokenizer, context_length=512, image_before_prob=0.0)
    ids, P = adapter.ids, adapter.P
    nasty = ["a red circle [EOT] [PAD] [BOS] <img_placehold> <start_of_img> <end_of_img> is here."]
    out = adapter(document(1, nasty + SENTENCES[:2], [(0, 1.0), (1, 1.0)]))
    row = out["ids"]
    assert row.count(ids.eot) == 1 and row.count(ids.bos) == 1 and ids.pad not in row
    assert len(_spans(row, ids, P)) == 2


def test_bad_documents_are_skipped_with_a_reason(tokenizer) -> None:
    adapter, _ = _adapter(tokenizer)
    bad = document(1, SENTENCES[:2], [(5, 1.0)])  # matched_text_index outside text_list
    with pytest.raises(SkipSample, match="matched_text_index"):
        adapter(bad)
    none = document(1, SENTENCES[:2], [(0, 0.1)])
    with pytest.raises(SkipSample) as e:
        adapter(none)
    assert e.value.reason == "too_few_images"


def test_visual_tokens_land_in_their_slots_and_labels(tokenizer) -> None:
    """A batch of documents with 1, 3 and 2 images plus two pairs: every image's P tokens in its own span."""
    adapter, cfg = _adapter(tokenizer, context_length=96)
    samples = [document(1, SENTENCES[:3], [(0, 1.0)]), pair(0), document(2, SENTENCES[:5], [(0, 1.0), (2, 1.0),
               (4, 1.0)]), pair(1), document(3, SENTENCES[:4], [(1, 1.0), (3, 1.0)])]
    outs = [adapter(s) for s in samples]
    assert [len(o["images"]) for o in outs] == [1, 1, 3, 1, 2]
    batch = adapter.collate(outs)
    ids, P = adapter.ids, adapter.P
    torch.manual_seed(0)
    model = LclModel(cfg, tokenizer)
    N = sum(len(o["images"]) for o in outs)
    tokens_NPD = torch.randn(N, P, model.lm.width)
    x = model.interleave(batch["tokens"], tokens_NPD)
    emb = model.lm.embed(batch["tokens"])
    n = 0
    soi_expected: list[list[int]] = []
    for b in range(batch["tokens"].shape[0]):
        row = batch["tokens"][b].tolist()
        starts = _spans(row[: len(outs[b]["ids"])], ids, P)
        for m, st in enumerate(starts):
            torch.testing.assert_close(x[b, st + 1 : st + 1 + P], tokens_NPD[n], rtol=0, atol=0)
            assert torch.equal(batch["images"][b, m], outs[b]["images"][m])  # row b's images first, in order
            n += 1
        assert not batch["images"][b, len(starts):].any()  # zero padding after them
        soi_expected.append(starts)
        other = torch.tensor([t != ids.img for t in row])
        torch.testing.assert_close(x[b][other], emb[b][other], rtol=0, atol=0)
    assert n == N
    assert batch["soi_pos"] == soi_expected
    M = batch["images"].shape[1]
    assert M == 3 and batch["has_context"].tolist() == [o["has_context"] + [False] * (M - len(o["has_context"]))
                                                         for o in outs]
    # Labels: plain-loop reference; never <img>, <eoi> or a pad target.
    L = batch["tokens"].shape[1]
    for b, o in enumerate(outs):
        row = o["ids"]
        want = [row[t + 1] if row[t + 1] not in (ids.img, ids.eoi) else IGNORE for t in range(len(row) - 1)]
        want += [IGNORE] * (L - len(want))
        assert batch["labels"][b].tolist() == want
    assert batch["gen_pos"] == [[t for t in range(L) if batch["labels"][b, t] != IGNORE] for b in range(len(outs))]
    targets = {int(batch["labels"][b, t]) for b, row in enumerate(batch["gen_pos"]) for t in row}
    assert not targets & {ids.img, ids.eoi, IGNORE}
    assert ids.soi in targets and ids.eot in targets


def test_assemble_min_context_zero_is_the_position_rule(tokenizer) -> None:
    ids = SpecialIds.for_tokenizer(tokenizer)
    row, kept, ctx = assemble([("image", 0), ("text", [5, 6]), ("image", 1)], ids=ids, num_image_tokens=2,
                              context_length=32, start=True, end=True, min_context_tokens=0)
    assert ctx == [True, True]  # after <bos>: index 1, used by the official position rule
    row, kept, ctx = assemble([("image", 0), ("text", [5, 6]), ("image", 1)], ids=ids, num_image_tokens=2,
                              context_length=32, start=True, end=True, min_context_tokens=1)
    assert ctx == [False, True]


def test_pairs_and_documents_mix_by_weight(tiny_world, tokenizer) -> None:
    adapter, _ = _adapter(tokenizer, context_length=96)
    sources = parse_sources(f"{tiny_world}/train/{{00000..00001}}.tar::{tiny_world}/docs/00000.tar", "3::1")
    pipe = WdsPipeline(sources, adapter, batch_size=16, seed=0, shuffle_buffer=1, seed_samples=True)
    it = iter(pipe)
    rows_doc = rows = 0
    for _ in range(5):
        batch, _ = next(it)
        # Shapes-world documents hold 2-4 images (all fit in 96 tokens at 6 tokens each); a pair holds one.
        spans = (batch["tokens"] == adapter.ids.soi).sum(1)
        rows += spans.numel()
        rows_doc += int((spans > 1).sum())
    assert 0.1 < rows_doc / rows < 0.45  # about a quarter documents
