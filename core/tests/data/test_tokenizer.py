"""Tokenizer wrapper: row layout invariants, round trips, HF tokenizers built locally (no downloads)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers

from vlp_core.data.tokenizer import Tokenizer, train_word_tokenizer

TEXTS = [
    "A large red circle is at the top left.", "a small blue star in the center, and a cross!",
    "There are 3 objects.",
]


@pytest.fixture()
def word_tok(tmp_path: Path) -> Tokenizer:
    path = train_word_tokenizer(TEXTS * 2, tmp_path / "tok" / "tokenizer.json")
    return Tokenizer.from_pretrained(str(path), context_length=12)


def test_specials_and_round_trip(word_tok: Tokenizer, tmp_path: Path) -> None:
    assert (word_tok.pad_id, word_tok.bos_id, word_tok.eot_id) == (0, 2, 3)
    for text in TEXTS:
        ids = word_tok.encode(text)
        assert min(ids) > 3  # no special or [UNK] ids for training words
        assert word_tok.decode(ids) == text.lower()
    assert word_tok.encode("a 905 circle") == word_tok.encode("a 9 0 5 circle")  # digits split one by one
    assert word_tok.encode("a purple circle")[1] == 1  # unseen word -> [UNK]
    # a folder holding only tokenizer.json loads the same tokenizer
    same = Tokenizer.from_pretrained(str(tmp_path / "tok"), context_length=12)
    assert torch.equal(same(TEXTS), word_tok(TEXTS))


def test_rows_padding_and_truncation(word_tok: Tokenizer) -> None:
    long = " ".join(["circle"] * 30)
    batch = word_tok([*TEXTS, long, ""])
    assert batch.shape == (5, 12) and batch.dtype == torch.long
    for text, row in zip([*TEXTS, long, ""], batch.tolist()):
        ids = word_tok.encode(text)
        n = min(len(ids), 12 - 2)
        assert row[0] == word_tok.bos_id
        assert row[1 : 1 + n] == ids[:n]
        assert row[1 + n] == word_tok.eot_id  # EOT is the last real token, also when truncated
        assert row[2 + n :] == [word_tok.pad_id] * (12 - 2 - n)
        assert word_tok.decode(row) == word_tok.decode(ids[:n])
    # batching does not change a row
    assert torch.equal(word_tok([TEXTS[1]])[0], batch[1])
    assert torch.equal(pickle.loads(pickle.dumps(word_tok))(TEXTS), word_tok(TEXTS))  # DataLoader workers


def test_errors(tmp_path: Path, word_tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="nope.json"):
        Tokenizer.from_pretrained(str(tmp_path / "nope.json"), context_length=8)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer.from_pretrained(str(tmp_path / "tok" / "tokenizer.json"), context_length=1)
    bare = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match="end-of-text"):
        Tokenizer.from_pretrained(str(tmp_path / "bare.json"), context_length=8)


def _hf_backend(special: list[str]) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate([*special, "[UNK]", "a", "red", "circle", "star", "."])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_hf_tokenizer_with_cls_sep(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=_hf_backend(["[PAD]", "[CLS]", "[SEP]"]), pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", unk_token="[UNK]",
    )
    hf.save_pretrained(tmp_path / "hf")
    tok = Tokenizer.from_pretrained(str(tmp_path / "hf"), context_length=6)
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (tok.bos_id, tok.eot_id, tok.pad_id) == (1, 2, 0) and tok.vocab_size == len(ref)
    text = "a red circle ."
    assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert tok([text, "a star star star star star"]).tolist() == [[1, 4, 5, 6, 8, 2], [1, 4, 7, 7, 7, 2]]
    assert tok.decode(tok([text])[0]) == ref.decode(tok.encode(text))


def test_hf_tokenizer_eos_only(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=_hf_backend(["<eos>"]), eos_token="<eos>", unk_token="[UNK]"
    )
    hf.save_pretrained(tmp_path / "hf")
    tok = Tokenizer.from_pretrained(str(tmp_path / "hf"), context_length=5)
    assert tok.bos_id is None and tok.eot_id == 0 and tok.pad_id == 0  # no pad token: pad with EOT
    assert tok(["red star"]).tolist() == [[3, 5, 0, 0, 0]]
    assert tok.decode([3, 5, 0, 0, 0]) == "red star"


@pytest.mark.parametrize("with_config", [True, False])
def test_padding_stored_in_tokenizer_json_is_ignored(tmp_path: Path, with_config: bool) -> None:
    """sentence-transformers ship tokenizer.json files with padding to 128 enabled: ids must stay the text's."""
    from transformers import PreTrainedTokenizerFast

    backend = _hf_backend(["[PAD]", "[CLS]", "[SEP]"])
    backend.enable_padding(pad_id=0, pad_token="[PAD]", length=16)
    backend.enable_truncation(max_length=3)
    folder = tmp_path / "hf"
    if with_config:
        hf = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                     sep_token="[SEP]", unk_token="[UNK]")
        hf.save_pretrained(folder)
    else:
        folder.mkdir()
        backend.save(str(folder / "tokenizer.json"))
    tok = Tokenizer.from_pretrained(str(folder), context_length=8)
    assert tok.encode("a red circle .") == [4, 5, 6, 8]
    assert tok(["a red circle ."]).tolist() == [[1, 4, 5, 6, 8, 2, 0, 0]]
