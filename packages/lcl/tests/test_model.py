"""Model parts against float64 references: attentive pooling, chunked head, context features, HF decoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SENTENCES, document, pair, tiny_cfg
from vlp_lcl import METHOD, LclModel
from vlp_lcl.model import AttentivePoolingProjection, chunked_nll_sum

from vlp_core.data.transforms import prepare_images

F64 = torch.float64


def test_attentive_pooling_matches_reference() -> None:
    torch.manual_seed(0)
    pool = AttentivePoolingProjection(12, 8, heads=2).to(F64)
    with torch.no_grad():
        for b in (pool.q_bias, pool.k_bias, pool.v_bias):
            b.normal_()
    x = torch.randn(3, 5, 12, dtype=F64)
    pooled, tokens = pool(x)
    # Reference: explicit per-head softmax attention; tokens = proj(v) per patch.
    q = pool.q(pool.norm_q(pool.query)) + pool.q_bias
    k = pool.k(pool.norm_k(x)) + pool.k_bias
    v = pool.v(pool.norm_v(x)) + pool.v_bias
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax((k[..., sl] @ q[0, sl]) / 2.0, dim=-1)  # [3, 5], scale 1/sqrt(4)
        heads.append((w.unsqueeze(-1) * v[..., sl]).sum(1))
    torch.testing.assert_close(pooled, pool.proj(torch.cat(heads, -1)))
    torch.testing.assert_close(tokens, pool.proj(v))
    # Shared V/out-proj, no bias on proj: the latent is a per-head mixture of the token contributions.
    assert pool.proj.bias is None


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_chunked_head_matches_full_cross_entropy(chunk: int) -> None:
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 11, bias=False)).to(F64)
    h = torch.randn(17, 6, dtype=F64, requires_grad=True)
    t = torch.randint(0, 11, (17,))
    got = chunked_nll_sum(head, h, t, chunk)
    got.backward()
    g_got = [h.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    h.grad = None
    head.zero_grad()
    want = F.cross_entropy(head(h), t, reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, [h.grad] + [p.grad for p in head.parameters()]):
        torch.testing.assert_close(a, b)


def _batch(tokenizer, cfg):
    adapter = METHOD.build_adapter(cfg, tokenizer)
    outs = [adapter(s) for s in (pair(2), pair(3), document(1, SENTENCES[:4], [(0, 1.0), (2, 1.0)]))]
    batch = adapter.collate(outs)
    batch["images"] = prepare_images(batch["images"], torch.device("cpu"))
    batch["lengths"] = [len(o["ids"]) for o in outs]
    return batch, adapter


def test_forward_features_match_a_plain_recomputation(tokenizer) -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = LclModel(cfg, tokenizer).to(F64)
    batch, adapter = _batch(tokenizer, cfg)
    batch["images"] = batch["images"].to(F64)
    out = model(batch)
    # Per sequence, recompute the LM on that row alone (no batch neighbours, no padding).
    flat = [batch["images"][b, m] for b, row in enumerate(batch["soi_pos"]) for m in range(len(row))]
    latent, toks = model.encode_patches(torch.stack(flat))
    torch.testing.assert_close(out["image_latent"], latent)
    n, nll, count = 0, torch.zeros((), dtype=F64), 0
    ctx = []
    ids = adapter.ids
    for b in range(batch["tokens"].shape[0]):
        row = batch["tokens"][b]
        row = row[: batch["lengths"][b]]
        k = int((row == ids.soi).sum())
        x = model.lm.embed(row[None]).clone()
        slots = (row == ids.img).nonzero().flatten()
        x[0, slots] = toks[n : n + k].reshape(-1, toks.shape[-1])
        h = model.lm.hidden(x)[0]
        for t in (row == ids.soi).nonzero().flatten().tolist():
            ctx.append(model.lm.final_norm(h[t]) @ model.text_projection)
        n += k
        tgt = row[1:]
        keep = (tgt != ids.img) & (tgt != ids.eoi)
        nll = nll + F.cross_entropy(model.lm_head(h[:-1][keep]), tgt[keep], reduction="sum")
        count += int(keep.sum())
    torch.testing.assert_close(out["context"], torch.stack(ctx))
    torch.testing.assert_close(out["gen_nll_sum"], nll)
    assert out["gen_tokens"] == count


def test_encode_text_is_the_context_at_soi_and_does_not_mutate(tokenizer) -> None:
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = LclModel(cfg, tokenizer).eval()
    adapter = METHOD.build_adapter(cfg, tokenizer)
    caption = "a red circle at the top left."
    tokens = tokenizer([caption, "a star."])
    before = tokens.clone()
    with torch.no_grad():
        feats = model.encode_text(tokens)
    assert torch.equal(tokens, before)
    # The same caption as a text-first pair: the context feature at its <soi>.
    ids = adapter.ids
    row = torch.tensor([[ids.bos, *adapter.encode(caption), ids.soi]])
    with torch.no_grad():
        h = model.lm.hidden(model.lm.embed(row))
        want = model.context_features(h[0, -1])
    torch.testing.assert_close(feats[0], want, rtol=1e-5, atol=1e-5)


def test_hf_causal_lm_through_inputs_embeds(tmp_path, tokenizer) -> None:
    from transformers import GPT2Config

    GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=128, n_embd=32, n_layer=1, n_head=2,
               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eot_id).save_pretrained(
        tmp_path)
    cfg = tiny_cfg()
    cfg.model.text.kind, cfg.model.text.hf_name = "hf", str(tmp_path)
    cfg.loss.hf_random_init = True
    torch.manual_seed(0)
    model = LclModel(cfg, tokenizer)
    assert model.lm.model.get_input_embeddings().weight.shape[0] == tokenizer.vocab_size + 3
    batch, _ = _batch(tokenizer, cfg)
    out = model(batch)
    loss = out["gen_nll_sum"] + out["context"].sum()
    loss.backward()
    assert model.visual.trunk.patch_embed.proj.weight.grad.abs().sum() > 0  # generation reaches the ViT
    # Causality through inputs_embeds: a prefix gives the same states.
    x = torch.randn(1, 9, 32)
    model.eval()  # GPT-2's dropout
    with torch.no_grad():
        torch.testing.assert_close(model.lm.hidden(x[:, :4]), model.lm.hidden(x)[:, :4], rtol=1e-5, atol=1e-5)


def test_embed_dim_must_equal_lm_width(tokenizer) -> None:
    cfg = tiny_cfg()
    cfg.model.embed_dim = 16
    with pytest.raises(ValueError, match="embed_dim"):
        LclModel(cfg, tokenizer)
