"""Text tower and attention-layer tests against ``nn.MultiheadAttention`` references and HF models.

Shape legend: B batch, L length, D width.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.config import TextConfig
from vlp_core.models import CausalTextTransformer, HFTextTower, TextOutput, build_text_tower
from vlp_core.models.layers import Attention, CrossAttention, padding_to_attn_mask

V, PAD, D = 40, 0, 16


def _tower(causal: bool = True, pool: str = "eot", depth: int = 2) -> CausalTextTransformer:
    torch.manual_seed(0)
    return CausalTextTransformer(
        vocab_size=V, context_length=12, width=D, depth=depth, heads=2, causal=causal, pad_id=PAD, pool=pool
    )


def _tokens(lengths: list[int], L: int = 10, seed: int = 0) -> torch.Tensor:
    """Right-padded ids: ``n`` real tokens in [1, V) (the last plays EOT), then PAD."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full((len(lengths), L), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, :n] = torch.randint(1, V, (n,), generator=g)
    return out


def _reference(tower: CausalTextTransformer, tokens_BL: torch.Tensor) -> torch.Tensor:
    """float64 re-implementation with nn.MultiheadAttention and an explicit additive mask (weights copied)."""
    L = tokens_BL.shape[1]
    x = tower.token_embedding.weight.double()[tokens_BL] + tower.positional_embedding.double()[:L]
    causal_LL = torch.full((L, L), float("-inf"), dtype=torch.float64).triu(1)
    pad_BL = tokens_BL == PAD
    for blk in tower.blocks:
        mha = nn.MultiheadAttention(D, 2, batch_first=True).double()
        with torch.no_grad():
            mha.in_proj_weight.copy_(blk.attn.qkv.weight)
            mha.in_proj_bias.copy_(blk.attn.qkv.bias)
            mha.out_proj.weight.copy_(blk.attn.proj.weight)
            mha.out_proj.bias.copy_(blk.attn.proj.bias)
        h = F.layer_norm(x, (D,), blk.ln_1.weight.double(), blk.ln_1.bias.double())
        if tower.causal:
            a = mha(h, h, h, attn_mask=causal_LL, need_weights=False)[0]
        else:
            a = mha(h, h, h, key_padding_mask=pad_BL, need_weights=False)[0]
        x = x + a
        h = F.layer_norm(x, (D,), blk.ln_2.weight.double(), blk.ln_2.bias.double())
        h = F.gelu(F.linear(h, blk.mlp.fc1.weight.double(), blk.mlp.fc1.bias.double()))
        x = x + F.linear(h, blk.mlp.fc2.weight.double(), blk.mlp.fc2.bias.double())
    return F.layer_norm(x, (D,), tower.ln_final.weight.double(), tower.ln_final.bias.double())


@pytest.mark.parametrize("causal", [True, False])
def test_matches_multihead_attention_reference(causal: bool) -> None:
    tower = _tower(causal=causal)
    tokens = _tokens([10, 4, 7])
    with torch.no_grad():
        out = tower(tokens)
        ref = _reference(tower, tokens)
    real = tokens != PAD  # pad rows are unconstrained for the non-causal tower
    torch.testing.assert_close(out.tokens[real].double(), ref[real], atol=1e-5, rtol=1e-4)
    assert isinstance(out, TextOutput) and out.pooled.shape == (3, D)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_does_not_change_pooled_but_content_does(causal: bool) -> None:
    for pool in ("eot", "mean", "first"):
        tower = _tower(causal=causal, pool=pool)
        short = _tokens([3, 5], L=6)
        long = torch.cat([short, torch.full((2, 6), PAD)], dim=1)[:, :12]  # same text, more padding
        with torch.no_grad():
            a, b = tower(short).pooled, tower(long).pooled
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            changed = short.clone()
            pos = 0 if pool == "first" else 1  # causal "first" only sees position 0
            changed[:, pos] = changed[:, pos] % (V - 1) + 1  # another non-pad id, before EOT
            assert not torch.allclose(tower(changed).pooled, a)


def test_pooling_matches_manual() -> None:
    tokens = _tokens([10, 2, 6])
    n = (tokens != PAD).sum(1)
    for pool in ("eot", "mean", "first"):
        tower = _tower(pool=pool)
        with torch.no_grad():
            out = tower(tokens)
        for i in range(3):
            seq = out.tokens[i]
            expect = {"eot": seq[n[i] - 1], "mean": seq[: n[i]].mean(0), "first": seq[0]}[pool]
            torch.testing.assert_close(out.pooled[i], expect)


def test_forward_embeds_equivalences() -> None:
    tower = _tower()
    tokens = _tokens([9, 3])
    with torch.no_grad():
        full = tower(tokens).tokens
        via_embeds = tower.forward_embeds(tower.embed_tokens(tokens))
        masked = tower.forward_embeds(tower.embed_tokens(tokens), attention_mask_BL=tokens != PAD)
    torch.testing.assert_close(via_embeds, full)
    real = tokens != PAD  # causal + right padding: the explicit mask changes nothing on real tokens
    torch.testing.assert_close(masked[real], full[real], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        tower.forward_embeds(torch.zeros(1, 13, D))


def test_forward_embeds_without_final_norm() -> None:
    """``final_norm=False`` is the residual stream the final norm is applied to; the causal prefix rule holds."""
    tower = _tower()
    tokens = _tokens([9, 3])
    with torch.no_grad():
        normed = tower.forward_embeds(tower.embed_tokens(tokens))
        raw = tower.forward_embeds(tower.embed_tokens(tokens), final_norm=False)
        prefix = tower.forward_embeds(tower.embed_tokens(tokens[:, :4]), final_norm=False)
    torch.testing.assert_close(tower.ln_final(raw), normed)
    assert not torch.allclose(raw, normed)
    torch.testing.assert_close(prefix, raw[:, :4], atol=1e-5, rtol=1e-5)  # later tokens cannot leak back


def test_grad_checkpointing_same_grads() -> None:
    tower = _tower()
    tokens = _tokens([9, 3])

    def grads() -> list[torch.Tensor]:
        tower.zero_grad(set_to_none=True)
        out = tower(tokens)
        (out.pooled.square().sum() + out.tokens.sum()).backward()
        return [p.grad.clone() for p in tower.parameters()]

    a = grads()
    tower.set_grad_checkpointing(True)
    b = grads()
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb)


def test_openclip_init_scales() -> None:
    tower = CausalTextTransformer(vocab_size=4000, context_length=77, width=64, depth=8, heads=4)
    assert abs(tower.token_embedding.weight.std().item() - 0.02) < 0.002
    assert abs(tower.positional_embedding.std().item() - 0.01) < 0.001
    proj_std = 64**-0.5 * 16**-0.5
    assert abs(tower.blocks[0].attn.proj.weight.std().item() - proj_std) / proj_std < 0.1


def test_attention_layers_match_multihead_attention() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, D)
    ctx = torch.randn(2, 3, 8)
    attn = Attention(D, 4)
    mha = nn.MultiheadAttention(D, 4, batch_first=True)
    cross = CrossAttention(D, 4, kv_dim=8)
    xmha = nn.MultiheadAttention(D, 4, batch_first=True, kdim=8, vdim=8)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.load_state_dict(attn.proj.state_dict())
        xmha.q_proj_weight.copy_(cross.q.weight)
        xmha.k_proj_weight.copy_(cross.kv.weight[:D])
        xmha.v_proj_weight.copy_(cross.kv.weight[D:])
        xmha.in_proj_bias.copy_(torch.cat([cross.q.bias, cross.kv.bias]))
        xmha.out_proj.load_state_dict(cross.proj.state_dict())
        keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
        ours = attn(x, attn_mask=padding_to_attn_mask(keep, causal=False))
        ref = mha(x, x, x, key_padding_mask=~keep, need_weights=False)[0]
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
        causal = torch.full((5, 5), float("-inf")).triu(1)
        torch.testing.assert_close(
            attn(x, is_causal=True),
            mha(x, x, x, attn_mask=causal, need_weights=False)[0],
            atol=1e-5,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            cross(x, ctx), xmha(x, ctx, ctx, need_weights=False)[0], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="boolean"):
        attn(x, attn_mask=torch.zeros(5, 5))


def test_left_padded_causal_mask_is_finite() -> None:
    tower = _tower()
    mask = torch.tensor([[False, False, True, True]])
    out = tower.forward_embeds(torch.randn(1, 4, D), attention_mask_BL=mask)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# Hugging Face towers


def _hf_models(tmp_path):  # -> dict[str, path]
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=V,
            hidden_size=D,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            pad_token_id=PAD,
        )
    )
    gpt2 = transformers.GPT2Model(
        transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=2, n_positions=16)
    )
    paths = {}
    for name, model in (("bert", bert), ("gpt2", gpt2)):
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
    return {"bert": (bert, paths["bert"]), "gpt2": (gpt2, paths["gpt2"])}


def test_hf_towers_pool_like_manual(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokens = _tokens([10, 3, 6])
    mask = tokens != PAD
    n = mask.sum(1)
    for kind, (model, path) in _hf_models(tmp_path).items():
        model.eval()
        with torch.no_grad():
            hidden = model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        for pool in ("eot", "mean", "first"):
            tower = HFTextTower(str(path), pool=pool, pad_id=PAD).eval()
            assert tower.width == D
            with torch.no_grad():
                out = tower(tokens)
            torch.testing.assert_close(out.tokens, hidden, atol=1e-5, rtol=1e-5)
            for i in range(3):
                h = hidden[i]
                expect = {"eot": h[n[i] - 1], "mean": h[: n[i]].mean(0), "first": h[0]}[pool]
                torch.testing.assert_close(out.pooled[i], expect, atol=1e-5, rtol=1e-5, msg=f"{kind} {pool}")
    built = build_text_tower(TextConfig(kind="hf", hf_name=str(path), pool="eot"), vocab_size=V, pad_id=PAD)
    assert isinstance(built, HFTextTower)
    with pytest.raises(ValueError, match="vocabulary"):
        build_text_tower(TextConfig(kind="hf", hf_name=str(path)), vocab_size=V + 1, pad_id=PAD)
    scratch = HFTextTower(str(path), pad_id=PAD, from_config=True)
    assert not torch.equal(scratch.model.wte.weight, model.wte.weight)


def test_build_text_tower_clip() -> None:
    tower = build_text_tower(
        TextConfig(width=16, heads=2, depth=1, context_length=8), vocab_size=V, pad_id=PAD
    )
    assert isinstance(tower, CausalTextTransformer) and tower.width == 16
    assert tower(_tokens([3], L=8)).tokens.shape == (1, 8, 16)
    with pytest.raises(ValueError, match="pool"):
        CausalTextTransformer(vocab_size=V, context_length=8, width=16, depth=1, heads=2, pool="max")
