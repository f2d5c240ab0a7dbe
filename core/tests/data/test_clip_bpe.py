"""``Tokenizer.from_pretrained("clip-bpe")`` against OpenCLIP's tokenizer (a test-only reference), id for id.

The corpus (:func:`corpus`, 300+ captions) covers unicode (accents, CJK, emoji, combining marks, right-to-left
scripts), HTML entities (also nested), mojibake that ftfy repairs, captions longer than the context, empty and
whitespace-only strings, punctuation runs, numbers, contractions, mixed case, newlines and tabs, and literal
special-token spellings.
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from vlp_core.data.tokenizer import ClipBpe, Tokenizer

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer, _clean_lower  # noqa: E402

WORDS = ["a", "photo", "of", "the", "red", "green", "blue", "circle", "square", "triangle", "star", "dog", "cat",
         "running", "on", "in", "at", "big", "small", "picture", "image", "woman", "man", "child", "playing", "with",
         "ball", "beach", "sunset", "city", "street", "night"]

HANDWRITTEN = [
    # unicode: accents, CJK, emoji (with modifiers and ZWJ), combining marks, right-to-left scripts
    "Café au lait on a wooden table", "naïve façade, São Paulo — Zürich, Kraków, Ångström",
    "東京の夜景", "北京烤鸭 and 小笼包", "한국어 캡션입니다", "ひらがなとカタカナ",
    "a dog 🐶 on the beach 🏖️", "thumbs up 👍🏽👍🏿", "family 👨‍👩‍👧‍👦 picnic", "flags 🇫🇷🇯🇵", "✨💯🔥",
    "e\u0301le\u0300ve", "Zalgo t\u0336e\u0337x\u0338t", "a\u0308o\u0308u\u0308", "\u0915\u094d\u0937 devanagari",
    "مرحبا بالعالم", "שלום עולם", "mixed عربي and English", "Ελληνικά κείμενο", "Русский текст, ЁЖИК",
    "\u200bzero\u200bwidth\u200b", "non\u00a0breaking\u2009thin space", "ﬁ ligature ﬀ", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    # HTML entities, also nested
    "Tom &amp; Jerry", "it&#39;s a dog", "&quot;quoted&quot; text", "nested &amp;amp; entity",
    "double &amp;quot;nested&amp;quot;", "&lt;b&gt;bold&lt;/b&gt;", "&copy; 2021 &mdash; all rights", "&#x1F600; hex",
    "&nbsp;&nbsp;padded&nbsp;", "&amp;#39;s twice", "broken &amp entity &#;",
    # mojibake that ftfy repairs
    "schÃ¶n", "cafÃ©", "Ã¼ber alles", "â€œsmart quotesâ€\x9d", "donâ€™t stop", "naÃ¯ve", "SeÃ±or",
    "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.",
    # empty and whitespace-only
    "", " ", "   ", "\t", "\n", "\n\t \r\n", "\u3000",
    # punctuation runs, numbers
    "!!!", "?!?!...", "wow!!! really???", "--- *** ###", "(((nested)))", "a...b", "\"'`~", "@user #hashtag $5",
    "1", "12345", "3.14159", "1,000,000 people", "24/7", "2021-06-01", "v1.2.3", "iphone 12 pro max", "١٢٣ ٤٥٦",
    "½ cup", "x² + y²", "Ⅻ roman",
    # contractions, mixed case
    "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd", "IT'S DON'T WE'RE", "the dog's ball",
    "O'Neil's cat", "rock 'n' roll", "'s 't 're 've 'm 'll 'd", "CamelCaseWords", "ALL CAPS CAPTION", "mIxEd CaSe",
    # newlines and tabs
    "line one\nline two", "tab\tseparated\tvalues", "  leading and trailing  ", "multi\n\n\nnewlines",
    # literal special-token spellings (OpenCLIP maps them to the special ids)
    "a <start_of_text> b", "x <end_of_text> y", "<END_OF_TEXT>", "<<start_of_text>>", "<|startoftext|>",
    # URLs, code, file names
    "https://example.com/path?q=1&x=2", "IMG_1234.JPG", "user@example.com", "snake_case_name",
]


def _random_caption(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:  # plain caption, random case
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 15))]
        return " ".join(w.upper() if rng.random() < 0.2 else w.capitalize() if rng.random() < 0.2 else w
                        for w in words)
    if kind == 1:  # very long: truncated at 77
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 200)))
    if kind == 2:  # random code points from many scripts and symbol blocks
        blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
                  (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1F6FF), (0x2000, 0x206F)]
        return "".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 40)))
    if kind == 3:  # words glued with punctuation, numbers, entities and whitespace
        glue = [" ", "", "-", "...", "!!", "\n", "\t", " &amp; ", "&#39;s ", " 42 ", "'re ", ", "]
        return "".join(rng.choice(WORDS) + rng.choice(glue) for _ in range(rng.randint(1, 12)))
    if kind == 4:  # long with unicode: truncation inside multi-token words
        return " ".join(rng.choice(["東京", "naïve", "🐶🐱", "Zürich", "emoji😀", "42", "it's"])
                        for _ in range(rng.randint(30, 90)))
    return " ".join(rng.choice(HANDWRITTEN) for _ in range(rng.randint(2, 4)))


def corpus() -> list[str]:
    rng = random.Random(0)
    return HANDWRITTEN + [_random_caption(rng) for _ in range(240)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained("clip-bpe", context_length=77)


@pytest.fixture(scope="module")
def ref() -> SimpleTokenizer:
    return SimpleTokenizer()


def test_attributes(tok: Tokenizer, ref: SimpleTokenizer) -> None:
    assert tok.name == "clip-bpe"
    assert (tok.vocab_size, tok.bos_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
    assert (tok.vocab_size, tok.bos_id, tok.eot_id) == (ref.vocab_size, ref.sot_token_id, ref.eot_token_id)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer.from_pretrained("clip-bpe", context_length=1)


def test_corpus_covers_the_cases() -> None:
    texts = corpus()
    assert len(texts) >= 300 and len(set(texts)) > 250
    assert ClipBpe.clean("schÃ¶n cafÃ©") == "schön café"  # ftfy repairs the mojibake
    assert ClipBpe.clean(" nested &amp;amp; A\n\tB ") == "nested & a b"  # unescaped twice, whitespace collapsed
    ref = SimpleTokenizer()
    lengths = [len(ref.encode(t)) for t in texts]
    assert sum(n > 75 for n in lengths) >= 40 and sum(n == 0 for n in lengths) >= 7


def test_clean_equals_open_clip_also_on_the_ascii_fast_path() -> None:
    """Plain ASCII skips ftfy: the boundary (``&``, ``\\r``, control characters, DEL, non-ASCII) is fuzzed."""
    rng = random.Random(2)
    alphabet = [chr(c) for c in range(0x20, 0x7F)] * 4 + list("\t\n\r\x00\x0b\x0c\x1b\x7f\x85\xa0é’ﬁ")
    texts = corpus() + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += ["a&amp;b", "x&lt;y", "a\rb", "a\x0cb", "a\x7fb", "TAB\tNEW\nLINE", "  Plain  ASCII  "]
    for text in texts:
        assert ClipBpe.clean(text) == _clean_lower(text), repr(text)


@pytest.mark.parametrize("context_length", [77, 16])
def test_rows_equal_open_clip(tok: Tokenizer, context_length: int) -> None:
    texts = corpus()
    mine = Tokenizer.from_pretrained("clip-bpe", context_length=context_length)(texts)
    theirs = open_clip.tokenize(texts, context_length=context_length)
    assert mine.shape == theirs.shape == (len(texts), context_length) and mine.dtype == torch.long
    for i, (a, b) in enumerate(zip(mine.tolist(), theirs.tolist())):
        end = b.index(49407, 1) + 1 if 49407 in b[1:] else context_length  # up to and including EOT
        assert a[:end] == b[:end], (i, texts[i])
        assert a == b, (i, texts[i])  # and the padding too (both pad with 0)
    truncated = [i for i, t in enumerate(texts) if len(tok.encode(t)) > context_length - 2]
    assert truncated and all(mine[i, -1] == 49407 for i in truncated)  # EOT kept last


def test_plain_ids_equal_simple_tokenizer(tok: Tokenizer, ref: SimpleTokenizer) -> None:
    """Whole id lists, untruncated: the Rust BPE equals OpenCLIP's Python BPE, also on random code points."""
    rng = random.Random(1)
    texts = corpus() + ["".join(chr(rng.randint(0x21, 0x2FFF)) for _ in range(rng.randint(1, 25)))
                        for _ in range(1000)]
    assert [tok.encode(t) for t in texts[:20]] == [ref.encode(t) for t in texts[:20]]
    mine = tok._encode_batch(texts)
    for text, ids in zip(texts, mine):
        assert ids == ref.encode(text), text


def test_decode(tok: Tokenizer, ref: SimpleTokenizer) -> None:
    plain = ["a photo of a dog", "two red circles and a small blue star on the left",
             "the quick brown fox jumps over the lazy dog", "it's 12 o'clock, time for tea!"]
    for text in plain:
        row = tok([text])[0]
        assert tok.decode(row) == tok.decode(row.tolist()) == tok.decode(tok.encode(text))
        if "'" not in text and "," not in text:
            assert tok.decode(row) == text  # the round trip on plain lowercase text
    assert tok.decode(tok(["it's 12 o'clock, time for tea!"])[0]) == "it 's 1 2 o ' clock , time for tea !"
    for text in corpus():
        ids = tok.encode(text)
        ids = ids[1:] if ids[:1] == [49406] else ids  # decode drops a leading SOT and stops at the first EOT
        ids = ids[: ids.index(49407)] if 49407 in ids else ids
        assert tok.decode(ids) == ref.decode(ids).strip(), text  # OpenCLIP's decode, without the final space
    with pytest.raises(ValueError, match="49408"):
        tok.decode([320, 49408])


def test_pickles_for_dataloader_workers(tok: Tokenizer) -> None:
    texts = corpus()[:50]
    blob = pickle.dumps(tok)
    assert len(blob) < 10_000  # rebuilt from the packaged vocabulary, not shipped
    assert torch.equal(pickle.loads(blob)(texts), tok(texts))
