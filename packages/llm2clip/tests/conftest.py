"""Tiny local text models (random weights, saved in tmp folders; nothing is downloaded) and a tiny world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_EVAL = {"zeroshot_shape": 12, "zeroshot_color": 16, "zeroshot_color_shape": 48, "retrieval": 24,
             "compositional": 8, "retrieval_long": 24, "retrieval_multi": 8}


def save_tiny_model(folder: Path, family: str, seed: int = 0) -> Path:
    """A width-32 Llama or BERT with a word-level tokenizer over the shapes-world vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    from vlp_core.data.synthetic import vocabulary_corpus
    from vlp_core.data.tokenizer import Tokenizer, train_word_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = vocabulary_corpus() + ["Given a sentence, retrieve a detailed relevant sentence;",
                                    "Given a detailed sentence, retrieve a short relevant sentence;"]
    train_word_tokenizer(corpus, folder / "tokenizer.json")
    tok = Tokenizer.from_pretrained(str(folder), context_length=8)
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=128,
                             bos_token_id=tok.bos_id, eos_token_id=tok.eot_id, pad_token_id=tok.pad_id)
        model = LlamaModel(config)
    else:
        config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=tok.vocab_size, max_position_embeddings=128, pad_token_id=tok.pad_id)
        model = BertModel(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "bert", "bert")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from vlp_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world") / "shapes"
    generate_world(root, seed=0, train_samples=96, docs=2, shard_size=32, eval_sizes=TINY_EVAL, progress=False)
    return root


LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def save_llama3_like(folder: Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny Llama with a tokenizer of Llama-3's kind: byte-level BPE, ``<|begin_of_text|>`` BOS and the
    Instruct model's ``<|eot_id|>`` end of text, no pad token (the core pads with EOT), via transformers."""
    import torch
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    from vlp_core.testing.presets import tiny_tokenizer

    tiny_tokenizer(folder / "bpe", kind="bpe", specials=LLAMA3_SPECIALS, vocab_size=400)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "bpe" / "tokenizer.json"),
                                  bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                         max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaModel(config).save_pretrained(folder)
    return folder


def save_minilm_like(folder: Path, *, seed: int = 0) -> Path:
    """A tiny BERT with a WordPiece tokenizer of all-MiniLM-L6-v2's kind ([CLS] ... [SEP], [PAD])."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from vlp_core.data.synthetic import vocabulary_corpus

    folder.mkdir(parents=True, exist_ok=True)
    lines = [*vocabulary_corpus(), "Given a sentence, retrieve a detailed relevant sentence;",
             "Given a detailed sentence, retrieve a short relevant sentence;"]
    words = sorted({w.strip(".,;!?").lower() for line in lines for w in line.split()} - {""})
    vocab = [*BERT_SPECIALS, ".", ",", ";", *words]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def llama3_like(tmp_path_factory) -> Path:
    return save_llama3_like(tmp_path_factory.mktemp("models") / "llama3")


@pytest.fixture(scope="session")
def minilm_like(tmp_path_factory) -> Path:
    return save_minilm_like(tmp_path_factory.mktemp("models") / "minilm")
