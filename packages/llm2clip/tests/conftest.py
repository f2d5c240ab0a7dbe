"""Tiny local text models (random weights, saved in tmp folders; nothing is downloaded) and a tiny world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_EVAL = {"zeroshot_shape": 12, "zeroshot_color": 16, "zeroshot_color_shape": 48, "retrieval": 24,
             "compositional": 8, "retrieval_long": 24}


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
