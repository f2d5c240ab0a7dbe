"""EOT pooling is exact whether or not the tokenizer pads with its end-of-text id.

References: OpenCLIP's text encoder (``argmax`` pooling, pad id 0) for the causal tower with the CLIP BPE
tokenizer, and a transformers GPT-2 called directly with the right attention mask for the HF tower with a
tokenizer that pads with EOT.
"""

from __future__ import annotations

import pytest
import torch

from vlp_core.config import TextConfig
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.models.text import HFTextTower, build_text_tower, real_token_mask

CAPTIONS = ["a red circle", "two blue squares next to a small green triangle on a white table", "", "  x  "]


def _openclip_text_to_vlp(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys -> CausalTextTransformer keys (written out here, independent of vlp-convert)."""
    out = {
        "token_embedding.weight": sd["token_embedding.weight"],
        "positional_embedding": sd["positional_embedding"],
        "ln_final.weight": sd["ln_final.weight"],
        "ln_final.bias": sd["ln_final.bias"],
    }
    for i in range(depth):
        src, dst = f"transformer.resblocks.{i}.", f"blocks.{i}."
        pairs = [("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.out_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc1"),
                 ("mlp.c_proj", "mlp.fc2")]
        for a, b in pairs:
            out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"]
            out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
        out[f"{dst}attn.qkv.weight"] = sd[f"{src}attn.in_proj_weight"]
        out[f"{dst}attn.qkv.bias"] = sd[f"{src}attn.in_proj_bias"]
    return out


def test_real_token_mask_first_eot() -> None:
    eot, pad = 9, 9
    tokens = torch.tensor([[1, 4, 5, 9, 9, 9], [9, 4, 9, 9, 9, 9], [1, 2, 3, 4, 5, 9]])
    mask = real_token_mask(tokens, eot_id=eot, pad_id=pad)
    assert mask.sum(1).tolist() == [4, 1, 6]
    # GPT-2 style: BOS has the EOT id; the real EOT is the first one after position 0.
    mask = real_token_mask(tokens, eot_id=eot, pad_id=pad, bos_is_eot=True)
    assert mask.sum(1).tolist() == [4, 3, 6]


def test_causal_tower_with_clip_bpe_equals_openclip() -> None:
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, _build_text_tower

    torch.manual_seed(0)
    depth = 2
    ref = _build_text_tower(48, CLIPTextCfg(context_length=77, vocab_size=49408, width=48, heads=3, layers=depth),
                            quick_gelu=True).eval()
    with torch.no_grad():
        ref.text_projection.copy_(torch.eye(48))  # so that ref(ids) is the pooled feature itself
    tok = Tokenizer.from_pretrained("clip-bpe", context_length=77)
    assert (tok.pad_id, tok.eot_id) == (0, 49407)
    cfg = TextConfig(context_length=77, width=48, depth=depth, heads=3, act="quick_gelu", norm_eps=1e-5)
    tower = build_text_tower(cfg, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eot_id=tok.eot_id,
                             bos_id=tok.bos_id).eval()
    tower.load_state_dict(_openclip_text_to_vlp(ref.state_dict(), depth))
    ids = tok(CAPTIONS)
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS))
    with torch.no_grad():
        want = ref(ids)
        pooled = tower(ids).pooled
        # Pooling must not depend on what fills the pads: pad with EOT instead of 0 (HF CLIP style).
        eot_padded = ids.clone()
        eot_padded[~real_token_mask(ids, eot_id=tok.eot_id, pad_id=tok.pad_id)] = tok.eot_id
        pooled_eot = tower(eot_padded).pooled
    assert (pooled - want).abs().max() <= 1e-4 * want.abs().max()
    torch.testing.assert_close(pooled_eot, pooled, rtol=0, atol=1e-6)


def test_hf_tower_with_tokenizer_padding_with_eot(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["<|endoftext|>", "a", "red", "circle", "blue", "square", "two", "big"]
    rust = RustTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    rust.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, eos_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(vocab_size=len(words), n_positions=16, n_embd=32,
                                                          n_layer=2, n_head=2)).eval()
    gpt2.save_pretrained(tmp_path / "model")

    tok = Tokenizer.from_pretrained(str(tmp_path / "model"), context_length=8)
    assert tok.pad_id == tok.eot_id == 0 and tok.bos_id is None
    tower = HFTextTower(str(tmp_path / "model"), pool="eot", pad_id=tok.pad_id, eot_id=tok.eot_id).eval()
    texts = ["a red circle", "two big blue square", "a"]
    ids = tok(texts)
    with torch.no_grad():
        pooled = tower(ids).pooled
        for row, text in enumerate(texts):
            n = len(text.split()) + 1  # the words, then EOT: attended to and pooled
            mask = torch.zeros(1, ids.shape[1], dtype=torch.long)
            mask[0, :n] = 1
            want = gpt2(input_ids=ids[row : row + 1], attention_mask=mask).last_hidden_state[0, n - 1]
            torch.testing.assert_close(pooled[row], want, rtol=0, atol=1e-5)
            # The old rule (mask = tokens != pad) would have pooled the token before EOT.
            assert not torch.allclose(pooled[row], gpt2(input_ids=ids[row : row + 1, : n - 1]).last_hidden_state[0, -1])
