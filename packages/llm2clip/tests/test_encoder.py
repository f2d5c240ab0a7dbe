"""The bidirectional conversion, padding-invariant mean pooling and the exact pool masks."""

from __future__ import annotations

import pytest
import torch
from vlp_llm2clip.encoder import LlmEncoder, load_encoder, masks_from_tokens, padding_only_mask, tokenize

from vlp_core.data.tokenizer import Tokenizer


def _llama(folder, impl: str, bidirectional: bool) -> LlmEncoder:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder, attn_implementation=impl).eval()
    return LlmEncoder(model, bidirectional=bidirectional)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_output_depends_on_later_token_causal_does_not(tiny_llama, impl):
    torch.manual_seed(0)
    ids = torch.randint(4, 40, (2, 7))
    attention = torch.ones(2, 7, dtype=torch.bool)
    attention[1, 5:] = False  # a padded row: the pitfall case where is_causal=False alone stays causal
    later = ids.clone()
    later[:, 4] = (later[:, 4] + 1 - 4) % 36 + 4  # change a later real token of both rows
    for bidirectional in (True, False):
        enc = _llama(tiny_llama, impl, bidirectional)
        mask = padding_only_mask(attention, torch.float32) if bidirectional else attention.long()
        with torch.no_grad():
            h1 = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
            h2 = enc.model(input_ids=later, attention_mask=mask).last_hidden_state
        first_change = (h1[:, 0] - h2[:, 0]).abs().max(dim=-1).values
        if bidirectional:
            assert (first_change > 1e-4).all(), first_change
        else:
            assert (first_change == 0).all(), first_change


def _pad(ids: list[int], length: int, pad: int, side: str) -> tuple[list[int], list[bool]]:
    n = length - len(ids)
    if side == "left":
        return [pad] * n + ids, [False] * n + [True] * len(ids)
    return ids + [pad] * n, [True] * len(ids) + [False] * n


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_mean_pooling_ignores_padding_on_both_sides(family, tiny_llama, tiny_bert):
    folder = tiny_llama if family == "llama" else tiny_bert
    enc = load_encoder(folder).eval()
    seqs = [[5, 9, 7, 11, 3], [6, 8, 3]]
    ref = []
    with torch.no_grad():
        for s in seqs:  # unpadded, one at a time; reference mean computed by hand
            ids = torch.tensor([s])
            hidden = enc.model(input_ids=ids, attention_mask=(padding_only_mask(torch.ones(1, len(s)),
                               torch.float32) if enc.is_decoder else torch.ones(1, len(s), dtype=torch.long)),
                               ).last_hidden_state
            ref.append(hidden[0].double().mean(0))
        for side in ("left", "right"):
            rows = [_pad(s, 8, 0, side) for s in seqs]
            ids = torch.tensor([r[0] for r in rows])
            attention = torch.tensor([r[1] for r in rows])
            got = enc(ids, attention)
            for i in range(2):
                torch.testing.assert_close(got[i].double(), ref[i], atol=2e-5, rtol=1e-4)
    assert got.dtype == torch.float32


def test_tokenize_pool_mask_covers_caption_and_eot_only(tiny_llama):
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=32)
    texts = ["a red circle.", "a small blue star at the top left."]
    plain = tokenize(tok, texts)
    assert torch.equal(plain["tokens"], tok(texts))  # the evaluation's rows
    attention, pool = masks_from_tokens(plain["tokens"], bos_id=tok.bos_id, eot_id=tok.eot_id, pool_bos=False)
    assert torch.equal(attention, plain["attention"]) and torch.equal(pool, plain["pool"])
    instr = "Given a sentence, retrieve a detailed relevant sentence;"
    out = tokenize(tok, texts, [instr, instr])
    n_instr = len(tok.encode(instr))
    for i, text in enumerate(texts):
        n_text = len(tok.encode(text)) + 1  # + EOT
        row_pool = out["pool"][i].nonzero().flatten().tolist()
        assert row_pool == list(range(1 + n_instr, 1 + n_instr + n_text))
        assert out["tokens"][i, row_pool[-1]] == tok.eot_id
        assert out["attention"][i].sum() == 1 + n_instr + n_text


def test_instruction_is_attended_but_not_pooled(tiny_llama):
    tok = Tokenizer.from_pretrained(str(tiny_llama), context_length=24)
    enc = load_encoder(tiny_llama).eval()
    a = tokenize(tok, ["a red circle."], ["Given a sentence, retrieve a detailed relevant sentence;"])
    b = tokenize(tok, ["a red circle."], ["Given a detailed sentence, retrieve a short relevant sentence;"])
    with torch.no_grad():
        ea, eb = enc(a["tokens"], a["attention"], a["pool"]), enc(b["tokens"], b["attention"], b["pool"])
    assert a["pool"].sum() == b["pool"].sum()
    assert (ea - eb).abs().max() > 1e-5  # bidirectional: the instruction changes the caption's states
