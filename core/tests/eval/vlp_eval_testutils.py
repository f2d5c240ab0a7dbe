"""Test helpers: a dummy factorised model, a word tokenizer, shard writers and float64 references.

Shape legend:
    B: batch    N: images    M: captions    C: classes    D: embedding width    L: token length
    S: image side
"""

from __future__ import annotations

import io
import json
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlp_core.data.tario import ShardWriter
from vlp_core.data.transforms import build_transform, decode_image, prepare_images

VOCAB = 97
CLASSES = ["red", "green", "blue", "big circle", "small square", "tiny star"]
TEMPLATES = ["a photo of a {}.", "a {} shape", "{}"]


class WordTokenizer:
    """``list[str] -> LongTensor [B, L]``: crc32 word ids in 1..VOCAB-1, 0 = padding."""

    def __init__(self, context_length: int = 8) -> None:
        self.context_length = context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out_BL = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % (VOCAB - 1) + 1 for w in text.lower().split()]
            ids = ids[: self.context_length]
            out_BL[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out_BL


class DummyModel(nn.Module):
    """Fixed random linear maps: flattened image -> D, bag of token embeddings -> D."""

    def __init__(self, image_size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Parameter(torch.randn(3 * image_size * image_size, dim, generator=g))
        self.token_emb = nn.Parameter(torch.randn(VOCAB, dim, generator=g))
        self.frozen = nn.Dropout(0.0)  # a submodule whose own mode the evaluators must restore

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return images_BCHW.flatten(1).to(self.image_proj.dtype) @ self.image_proj

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        mask_BL1 = (tokens_BL > 0).unsqueeze(-1).to(self.token_emb.dtype)
        return (self.token_emb[tokens_BL] * mask_BL1).sum(dim=1)


def ref_image_emb(model: DummyModel, jpgs: list[bytes], image_size: int) -> torch.Tensor:
    """float64 normalised image embeddings computed without the evaluation code."""
    tf = build_transform(image_size)
    imgs = torch.stack([tf(decode_image(b)) for b in jpgs])
    x = prepare_images(imgs, "cpu", torch.float64)
    e = x.flatten(1) @ model.image_proj.detach().double()
    return e / e.norm(dim=1, keepdim=True)


def ref_text_emb(model: DummyModel, tokenizer: WordTokenizer, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts)
    e = (model.token_emb.detach().double()[tokens] * (tokens > 0).unsqueeze(-1).double()).sum(1)
    return e / e.norm(dim=1, keepdim=True)


def jpeg_bytes(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(folder: Path, samples: list[dict], max_count: int = 4) -> None:
    """Write samples (``__key__`` added) into ``folder/%05d.tar`` shards."""
    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(str(folder / "%05d.tar"), max_count=max_count) as w:
        for i, s in enumerate(samples):
            w.write({"__key__": f"{i:06d}", **s})


def retrieval_samples(n: int, seed: int = 0) -> tuple[list[dict], list[list[str]]]:
    """``n`` samples with 0..3 captions each (varying counts; some captions repeat across images)."""
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "circle", "square", "small", "large", "left", "right"]
    samples, caps = [], []
    for i in range(n):
        k = int(rng.integers(1, 4)) if i != 2 else 0  # image 2 has no caption at all
        c = [" ".join(rng.choice(words, size=3)) for _ in range(k)]
        samples.append({"jpg": jpeg_bytes(1000 + i), "json": json.dumps({"captions": c})})
        caps.append(c)
    return samples, caps


# Captions that repeat across images (5 unique texts over 9 captions), as in the shapes world's retrieval_multi.
TEXT_MATCH_CAPTIONS = [["red circle", "blue square"], ["red circle"], ["green star", "blue square"],
                       ["red circle", "small cross"], ["green star"], [], ["tiny dot"]]


def write_text_match_set(folder: Path) -> None:
    """A retrieval set whose ``set.json`` asks for matching by caption text (captions of TEXT_MATCH_CAPTIONS)."""
    samples = [{"jpg": jpeg_bytes(300 + i), "json": json.dumps({"captions": c})}
               for i, c in enumerate(TEXT_MATCH_CAPTIONS)]
    write_shards(folder, samples, max_count=3)
    (folder / "set.json").write_text(json.dumps({"match": "text"}))


def write_zeroshot(folder: Path, n: int, classnames: list[str], templates: list[str], seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = [int(rng.integers(0, len(classnames))) for _ in range(n)]
    jpgs = [jpeg_bytes(seed * 10_000 + i) for i in range(n)]
    write_shards(folder, [{"jpg": j, "cls": str(lab)} for j, lab in zip(jpgs, labels)])
    (folder / "classes.json").write_text(json.dumps({"classnames": classnames, "templates": templates}))
    return jpgs, labels


# ---------------------------------------------------------------------------------------------------------
# Brute-force references over the full score matrix (float64 / exact fractions)


def fair_hit(greater: int, ties_wrong: int, ties_right: int, k: int) -> Fraction:
    """P(first correct within the top k) as a sum over its position in a random order of the tie group."""
    total = Fraction(0)
    p_all_wrong_so_far = Fraction(1)
    n = ties_wrong + ties_right
    for j in range(n):
        if greater + j >= k:
            break
        p_first_correct_here = p_all_wrong_so_far * Fraction(ties_right, n - j)
        total += p_first_correct_here
        p_all_wrong_so_far *= Fraction(ties_wrong - j, n - j) if ties_wrong - j > 0 else 0
    return total


def ref_recall(scores_NM: np.ndarray, c2i: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K (percent) from the full image x caption matrix."""
    N, M = scores_NM.shape
    out: dict[str, float] = {}
    q = [n for n in range(N) if (c2i == n).any()]
    for k in ks:
        hits = Fraction(0)
        for n in q:
            own = c2i == n
            best = scores_NM[n, own].max()
            g = int((scores_NM[n] > best).sum())
            tr = int((scores_NM[n, own] == best).sum())
            tw = int((scores_NM[n, ~own] == best).sum())
            hits += fair_hit(g, tw, tr, k)
        out[f"i2t_R@{k}"] = 100 * float(hits) / len(q)
    for k in ks:
        hits = Fraction(0)
        for m in range(M):
            col = scores_NM[:, m]
            best = col[c2i[m]]
            g = int((col > best).sum())
            tw = int((col == best).sum()) - 1
            hits += fair_hit(g, tw, 1, k)
        out[f"t2i_R@{k}"] = 100 * float(hits) / M
    out["mean_recall"] = float(np.mean([v for v in out.values()]))
    return out


def write_tiny_eval_sets(root: Path) -> None:
    """A world root with two zero-shot sets, retrieval (one broken image) and compositional shards."""
    ev = root / "eval"
    write_zeroshot(ev / "zeroshot_shape", 6, CLASSES[3:], TEMPLATES, seed=6)
    write_zeroshot(ev / "zeroshot_color", 6, CLASSES[:3], TEMPLATES, seed=7)
    samples, _ = retrieval_samples(6, seed=8)
    samples.append({"jpg": b"broken", "json": json.dumps({"captions": ["x"]})})
    write_shards(ev / "retrieval", samples)
    pair = json.dumps({"positive": "red", "negative": "blue"})
    comp = [{"jpg": jpeg_bytes(i), "json": pair} for i in range(4)]
    write_shards(ev / "compositional", comp)
