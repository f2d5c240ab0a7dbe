"""Tokenization: one wrapper over ``tokenizers`` files and ``transformers`` tokenizers; word-level training.

Every batch comes out as ``[B, context_length]`` int64 rows ``[BOS] ids... [EOT] pad pad ...``; a long text is
truncated so that EOT is always the last real token (EOT pooling needs it). Note that ``eot_id`` is not
necessarily the largest id (it is 3 for :func:`train_word_tokenizer`), so models must locate EOT by id or by
length, not with ``argmax`` as OpenAI CLIP does; and ``pad_id`` may equal ``eot_id`` (HF tokenizers without a
pad token), in which case the first EOT is the real one.
"""

from __future__ import annotations

import os

# Fork safety: the Rust thread pool must not be started before DataLoader workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import re  # noqa: E402
from collections.abc import Iterable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import tokenizers  # noqa: E402
import torch  # noqa: E402
from tokenizers import models, normalizers, pre_tokenizers, trainers  # noqa: E402

__all__ = ["Tokenizer", "train_word_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOT]")
# Special-token spellings tried, in order, for a bare tokenizer.json that has no tokenizer_config.json.
_BOS_NAMES = ("[BOS]", "<|startoftext|>", "<s>", "[CLS]", "<bos>")
_EOT_NAMES = ("[EOT]", "<|endoftext|>", "</s>", "[SEP]", "<eos>")
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,!?;:])")


class Tokenizer:
    """Batch tokenizer to fixed-length id tensors. Build with :meth:`from_pretrained`.

    Attributes:
        context_length: Row length of the id tensors.
        vocab_size: Number of ids (including added/special tokens).
        pad_id: Id used after EOT.
        bos_id: Id put first, or None when the tokenizer has no BOS/CLS token.
        eot_id: Id closing every row's real tokens.
    """

    def __init__(
        self, *, context_length: int, vocab_size: int, pad_id: int, bos_id: int | None, eot_id: int,
        backend: tokenizers.Tokenizer | None = None, hf: Any = None, name: str = "",
    ) -> None:
        minimum = 2 if bos_id is not None else 1
        if context_length < minimum:
            raise ValueError(
                f"tokenizer {name!r}: context_length {context_length} must be >= {minimum} "
                "(room for the special tokens)"
            )
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.eot_id = eot_id
        self.name = name
        self._backend = backend  # a Rust tokenizer (our tokenizer.json or a fast HF tokenizer's backend)
        self._hf = hf  # a transformers tokenizer (used for slow tokenizers and for decoding)
        self._word_level = backend is not None and isinstance(backend.model, models.WordLevel)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, context_length: int) -> Tokenizer:
        """Load a tokenizer.

        Args:
            name_or_path: A ``tokenizer.json`` file; a folder holding ``tokenizer.json`` and no
                ``tokenizer_config.json`` (both read with ``tokenizers``); else a transformers tokenizer
                name or folder (``AutoTokenizer``).
            context_length: Row length of the produced id tensors.

        Raises:
            ValueError: The path does not exist / cannot be loaded, or no end-of-text token is found.
        """
        path = Path(name_or_path).expanduser()
        file = path if path.is_file() else path / "tokenizer.json"
        if file.is_file() and not (path.is_dir() and (path / "tokenizer_config.json").is_file()):
            try:
                backend = tokenizers.Tokenizer.from_file(str(file))
            except Exception as e:  # the Rust side raises a bare Exception on bad JSON
                raise ValueError(f"tokenizer file {file} could not be read: {e}") from None
            _plain(backend)
            ids = {n: backend.token_to_id(n) for n in (*_BOS_NAMES, *_EOT_NAMES, *_PAD_NAMES)}
            eot = next((ids[n] for n in _EOT_NAMES if ids[n] is not None), None)
            if eot is None:
                raise ValueError(
                    f"tokenizer file {file} has no end-of-text token (one of {', '.join(_EOT_NAMES)})"
                )
            bos = next((ids[n] for n in _BOS_NAMES if ids[n] is not None), None)
            pad = next((ids[n] for n in _PAD_NAMES if ids[n] is not None), eot)
            return cls(
                context_length=context_length, vocab_size=backend.get_vocab_size(with_added_tokens=True),
                pad_id=pad, bos_id=bos, eot_id=eot, backend=backend, name=str(name_or_path),
            )
        looks_local = path.is_absolute() or str(name_or_path).startswith((".", "~")) or path.suffix == ".json"
        if looks_local and not path.exists():
            raise ValueError(f"tokenizer path {name_or_path} does not exist")
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"tokenizer {name_or_path!r} could not be loaded (not a local tokenizer.json or "
                f"folder, nor a transformers tokenizer): {e}"
            ) from None
        bos = hf.bos_token_id if hf.bos_token_id is not None else hf.cls_token_id
        eot = hf.eos_token_id if hf.eos_token_id is not None else hf.sep_token_id
        if eot is None:
            raise ValueError(
                f"tokenizer {name_or_path!r} has neither an eos nor a sep token to end texts with"
            )
        pad = hf.pad_token_id if hf.pad_token_id is not None else eot
        backend = hf.backend_tokenizer if getattr(hf, "is_fast", False) else None
        if backend is not None:
            _plain(backend)
        return cls(
            context_length=context_length, vocab_size=len(hf), pad_id=pad, bos_id=bos, eot_id=eot,
            backend=backend, hf=hf, name=str(name_or_path),
        )

    def _encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return self._hf(list(texts), add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> list[int]:
        """Plain ids of ``text``, without special tokens or truncation."""
        return self._encode_batch([text])[0]

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Tokenize a batch into a ``[B, context_length]`` LongTensor: ``[BOS] ids [EOT]`` then ``pad_id``."""
        if isinstance(texts, str):
            texts = [texts]
        head = [self.bos_id] if self.bos_id is not None else []
        room = self.context_length - len(head) - 1
        rows = []
        for ids in self._encode_batch(texts):
            row = head + ids[:room] + [self.eot_id]
            rows.append(row + [self.pad_id] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.context_length)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; special tokens (and everything after the first EOT) are dropped."""
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if ids and self.bos_id is not None and ids[0] == self.bos_id:
            ids = ids[1:]  # first, as BOS may equal EOT (GPT-2 style)
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=True)
        assert self._backend is not None
        text = self._backend.decode(ids, skip_special_tokens=True)
        # Word-level vocabularies have no decoder: tokens come back space-joined, so glue punctuation back.
        return _SPACE_BEFORE_PUNCT.sub(r"\1", text) if self._word_level else text

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, context_length={self.context_length}, "
            f"bos={self.bos_id}, eot={self.eot_id}, pad={self.pad_id})"
        )


def _plain(backend: tokenizers.Tokenizer) -> None:
    """Turn off padding and truncation stored in a tokenizer.json (sentence-transformers ship files padded
    to 128): the ids must be the text's alone, since ``__call__`` adds EOT and pads itself."""
    backend.no_padding()
    backend.no_truncation()


def train_word_tokenizer(texts: Iterable[str], path: str | Path, *, min_frequency: int = 1) -> Path:
    """Train a lowercase word-level tokenizer on ``texts`` and save it as ``path`` (a tokenizer.json file).

    Words split on whitespace and punctuation, digits one by one (so arbitrary numbers never become
    ``[UNK]``). Special tokens take ids 0-3: ``[PAD]``, ``[UNK]``, ``[BOS]``, ``[EOT]``.
    """
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    trainer = trainers.WordLevelTrainer(
        special_tokens=list(SPECIAL_TOKENS), min_frequency=min_frequency, show_progress=False
    )
    # Digits always in the vocabulary, whatever the training text holds.
    digits = ["0 1 2 3 4 5 6 7 8 9"] * max(1, min_frequency)
    tok.train_from_iterator([*texts, *digits], trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path
