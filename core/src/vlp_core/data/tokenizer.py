"""Tokenization: OpenAI's CLIP BPE (offline), ``tokenizers`` files and ``transformers`` tokenizers; word-level training.

Every batch comes out as ``[B, context_length]`` int64 rows ``[BOS] ids... [EOT] pad pad ...``; a long text is
truncated so that EOT is always the last real token (EOT pooling needs it). Note that ``eot_id`` is not
necessarily the largest id (it is 3 for :func:`train_word_tokenizer`), so models must locate EOT by id or by
length, not with ``argmax`` as OpenAI CLIP does; and ``pad_id`` may equal ``eot_id`` (HF tokenizers without a
pad token), in which case the first EOT is the real one.

``Tokenizer.from_pretrained("clip-bpe", ...)`` is OpenAI CLIP's tokenizer, id for id OpenCLIP's
``SimpleTokenizer`` / ``open_clip.tokenize`` (clean-up ``lower``), from the vocabulary shipped in
``vlp_core/assets``: the text clean-up and the regex split run in Python, exactly as OpenCLIP writes them, and
the byte-level BPE of every word in the Rust ``tokenizers`` library (equal to OpenCLIP's Python BPE: the tests
compare them). Ids: ``<start_of_text>`` 49406 (BOS), ``<end_of_text>`` 49407 (EOT), padding 0 (a real token,
``!``, as in OpenCLIP; EOT is found by position). A literal ``<start_of_text>``/``<end_of_text>`` in a caption
becomes that special id, as in OpenCLIP.
"""
from __future__ import annotations

import os

# Fork safety: the Rust thread pool must not be started before DataLoader workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import functools  # noqa: E402
import gzip  # noqa: E402
import html  # noqa: E402
import re  # noqa: E402
from collections.abc import Iterable, Sequence  # noqa: E402
from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ftfy  # noqa: E402
import regex  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
from tokenizers import models, normalizers, pre_tokenizers, trainers  # noqa: E402

__all__ = ["Tokenizer", "train_word_tokenizer", "SPECIAL_TOKENS", "CLIP_BPE", "ClipBpe"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOT]")
# Special-token spellings tried, in order, for a bare tokenizer.json that has no tokenizer_config.json.
_BOS_NAMES = ("[BOS]", "<|startoftext|>", "<s>", "[CLS]", "<bos>")
_EOT_NAMES = ("[EOT]", "<|endoftext|>", "</s>", "[SEP]", "<eos>")
_PAD_NAMES = ("[PAD]", "<pad>", "<|pad|>")
_SPACE_BEFORE_PUNCT = re.compile(r" ([.,!?;:])")

CLIP_BPE = "clip-bpe"  # the name of OpenAI's CLIP BPE for Tokenizer.from_pretrained
_CLIP_ASSET = "bpe_simple_vocab_16e6.txt.gz"
_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")  # ids 49406, 49407 (OpenCLIP's spelling)
_CLIP_MERGES = 49152 - 256 - 2  # merges OpenAI CLIP uses: lines 1..48894 of the vocabulary file
_PLAIN_ASCII = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")  # text ftfy.fix_text and html.unescape return unchanged
# OpenCLIP's pre-tokenization, character for character (special tokens first, then contractions, letters,
# single digits, other non-space runs).
_CLIP_SPLIT = regex.compile(
    "|".join(_CLIP_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
)


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
        backend: tokenizers.Tokenizer | None = None, hf: Any = None, clip: ClipBpe | None = None,
        name: str = "",
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
        self._clip = clip  # OpenAI's CLIP BPE ("clip-bpe")
        self._word_level = backend is not None and isinstance(backend.model, models.WordLevel)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, context_length: int) -> Tokenizer:
        """Load a tokenizer.

        Args:
            name_or_path: ``"clip-bpe"`` (OpenAI CLIP's BPE, shipped with vlp-core, no network; the name wins
                over a folder of that name); a ``tokenizer.json`` file; a folder holding ``tokenizer.json`` and no
                ``tokenizer_config.json`` (both read with ``tokenizers``); else a transformers tokenizer
                name or folder (``AutoTokenizer``).
            context_length: Row length of the produced id tensors.

        Raises:
            ValueError: The path does not exist / cannot be loaded, or no end-of-text token is found.
        """
        if str(name_or_path) == CLIP_BPE:
            clip = clip_bpe()
            return cls(
                context_length=context_length, vocab_size=clip.vocab_size, pad_id=0, bos_id=clip.sot_id,
                eot_id=clip.eot_id, clip=clip, name=CLIP_BPE,
            )
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
                f"folder, nor a transformers tokenizer): {' '.join(str(e).split())}"
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

    def _encode_batch(self, texts: Sequence[str], limit: int | None = None) -> list[list[int]]:
        """Plain ids of every text; ``limit`` lets a backend stop early (rows keep at most that many ids)."""
        if self._clip is not None:
            return self._clip.encode_batch(texts, max_words=limit)
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
        for ids in self._encode_batch(texts, limit=room):
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
        if self._clip is not None:
            return self._clip.decode(ids)
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


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable character table (bytes that are printable map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


class ClipBpe:
    """OpenAI CLIP's byte-level BPE, id for id OpenCLIP's ``SimpleTokenizer`` (clean-up ``lower``).

    Build it with :func:`clip_bpe` (one per process). Pickles by name, so DataLoader workers rebuild it from
    the packaged vocabulary (0.1 s) instead of receiving 49,408 entries.

    Attributes:
        vocab_size: 49408 (256 bytes, the same with ``</w>``, 48,894 merges, 2 special tokens).
        sot_id: ``<start_of_text>`` (49406).
        eot_id: ``<end_of_text>`` (49407).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            with gzip.open(path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ValueError(f"CLIP BPE vocabulary {path} could not be read: {e}") from None
        merges = [tuple(line.split()) for line in lines[1 : _CLIP_MERGES + 1]]
        if len(merges) != _CLIP_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"CLIP BPE vocabulary {path} does not hold {_CLIP_MERGES} merge pairs")
        chars = list(_bytes_to_unicode().values())
        self.merges: list[tuple[str, ...]] = merges
        self._tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), *_CLIP_SPECIALS]
        vocab = {t: i for i, t in enumerate(self._tokens)}
        if len(vocab) != len(self._tokens):
            raise ValueError(f"CLIP BPE vocabulary {path} has repeated tokens")
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = vocab[_CLIP_SPECIALS[0]], vocab[_CLIP_SPECIALS[1]]
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        # The Rust side sees words already split: ByteLevel only maps each word's bytes to characters, and the
        # BPE appends </w> to a word's last character, as OpenCLIP's ``bpe`` does.
        bpe = tokenizers.Tokenizer(models.BPE(vocab, merges, end_of_word_suffix="</w>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        bpe.add_special_tokens([tokenizers.AddedToken(t, normalized=False) for t in _CLIP_SPECIALS])
        self._bpe = bpe
        self._encode = getattr(bpe, "encode_batch_fast", bpe.encode_batch)  # _fast: no offsets (tokenizers>=0.20)

    @staticmethod
    def clean(text: str) -> str:
        """OpenCLIP's ``_clean_lower``: ftfy, HTML unescape twice, strip, collapse whitespace, lowercase.

        Printable ASCII with tabs and newlines and no ``&`` skips ftfy and the unescaping, which leave such text
        unchanged (ftfy returns ASCII as it is; its other fixes need non-ASCII, control characters, ``\\r``
        or ``&``): most English captions, at a fraction of ftfy's cost.
        """
        if _PLAIN_ASCII.fullmatch(text) is None:
            text = html.unescape(html.unescape(ftfy.fix_text(text)))
        return " ".join(text.split()).lower()  # split() also strips, like OpenCLIP's strip() calls

    @staticmethod
    def words(text: str) -> list[str]:
        """The cleaned text split into BPE words by OpenCLIP's regular expression."""
        return _CLIP_SPLIT.findall(ClipBpe.clean(text))

    def encode_batch(self, texts: Sequence[str], max_words: int | None = None) -> list[list[int]]:
        """Plain ids of every text (no SOT/EOT). ``max_words`` BPE-encodes only a text's first words: every
        word gives at least one id, so the first ``max_words`` ids are the same (truncation skips the rest)."""
        words = [self.words(t)[:max_words] for t in texts]
        return [e.ids for e in self._encode(words, is_pretokenized=True, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """OpenCLIP's ``decode`` (bytes back to UTF-8, bad bytes replaced, ``</w>`` -> space), stripped."""
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"clip-bpe: token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        data = bytes(self._byte_of[c] for c in "".join(self._tokens[i] for i in ids))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    @property
    def tokens(self) -> list[str]:
        """Every token in id order (byte characters, the same with ``</w>``, the merges, the 2 specials)."""
        return list(self._tokens)

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return clip_bpe, ()


@functools.lru_cache(maxsize=1)
def clip_bpe() -> ClipBpe:
    """The process's :class:`ClipBpe`, built from ``vlp_core/assets/bpe_simple_vocab_16e6.txt.gz``."""
    path = resources.files("vlp_core").joinpath("assets", _CLIP_ASSET)
    if not path.is_file():
        raise ValueError(f"the CLIP BPE vocabulary {path} is missing from the vlp-core install (package data)")
    with resources.as_file(path) as file:
        return ClipBpe(file)


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
