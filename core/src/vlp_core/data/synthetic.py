"""The shapes world: a seeded procedural image-text data set for fast, meaningful end-to-end runs.

Images show 1-3 coloured shapes (6 shapes x 8 colours x 2 sizes) on cells of a 3x3 grid over a noisy
background. Each training image carries three captions of rising quality (a short web-like ``raw`` one
about its main object, optionally corrupted with probability ``noise``; a ``clean`` one naming every object;
a multi-sentence ``long`` one with relations), so that caption-noise and caption-rewriting methods have
something to fix. The world also holds MMC4-style interleaved documents and held-out evaluation sets
(zero-shot classification, retrieval with short and with long captions, attribute-swap
compositionality, and ``retrieval_multi``: images of 2-3 objects with distinct colours and shapes, one
caption per object naming only that object, for caption-conditioned image embeddings such as Llip's).
The same single-object caption text recurs across ``retrieval_multi``'s images, so its ``set.json``
(``{"match": "text"}``) asks the retrieval evaluation to count a hit by caption text rather than by image.

Determinism: every sample draws from its own generator seeded with ``(seed, stream, index)``, so a sample
does not depend on the sizes of the other splits, and the evaluation streams never coincide with training.
Zero-shot class order: shapes in :data:`SHAPES` order, colours in :data:`COLORS` order, and colour-shape
class ``color_idx * len(SHAPES) + shape_idx`` named ``"<color> <shape>"``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlp_core.data.tario import ShardWriter

if TYPE_CHECKING:
    from vlp_core.config import DataConfig

# fmt: off
__all__ = [
    "SHAPES", "COLORS", "COLOR_RGB", "SIZES", "ROWS", "COLS", "WORLD_VERSION", "DEFAULT_EVAL_SIZES",
    "ZEROSHOT_TEMPLATES", "sample_objects", "render_sample", "raw_caption", "clean_caption", "long_sentences",
    "long_caption", "retrieval_captions", "swap_colors", "vocabulary_corpus", "generate_world",
    "generate_world_atomic", "default_world_dir", "ensure_world", "default_workers", "is_world",
    "object_caption", "SET_META",
]

log = logging.getLogger(__name__)

# 2: adds the long-caption retrieval set
# 3: adds the multi-object single-object caption retrieval set
WORLD_VERSION = 3
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
# Saturated colours far from the grey backgrounds (whose channels stay within ~15..140 before noise).
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (40, 190, 45), "blue": (40, 80, 245), "yellow": (240, 225, 30),
    "purple": (150, 45, 210), "orange": (250, 135, 20), "cyan": (30, 220, 230), "white": (250, 250, 250),
}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTION = {"small": 0.22, "large": 0.42}  # bounding diameter as a fraction of the image side
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
_NUMBER = ("zero", "one", "two", "three")
_STREAMS = {"train": 0, "docs": 1, "zeroshot_shape": 2, "zeroshot_color": 3, "zeroshot_color_shape": 4,
            "retrieval": 5, "compositional": 6, "retrieval_long": 7, "retrieval_multi": 8}
# Balanced defaults: 996 = 166 x 6 shapes, 1000 = 125 x 8 colours, 960 = 20 x 48 colour-shapes.
DEFAULT_EVAL_SIZES: dict[str, int] = {"zeroshot_shape": 996, "zeroshot_color": 1000,
                                      "zeroshot_color_shape": 960, "retrieval": 1000, "compositional": 500,
                                      "retrieval_long": 1000, "retrieval_multi": 1000}
# ``set.json`` of the evaluation sets that need one: how the retrieval evaluation counts a hit.
SET_META: dict[str, dict[str, str]] = {"retrieval_multi": {"match": "text"}}
ZEROSHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Shape and colour-shape class names are nouns ("star", "red star").
    "noun": ("a photo of a {}.", "a {}.", "a picture of a {}.", "a {} on a noisy background.",
             "a drawing of a {}."),
    # Colour class names are adjectives ("red"), so the templates supply the noun.
    "color": ("a photo of a {} shape.", "a {} object.", "a picture of something {}.",
              "a {} shape on a noisy background.", "a drawing of a {} shape."),
}
_RAW_TEMPLATES = ("{c} {s}", "a {c} {s}", "a photo of a {z} {c} {s}", "{c} {s} {loc}", "my {c} {s} pic",
                  "{z} {c} {s}", "the {c} {s}", "{c} {s} image", "nice {c} {s}", "picture of a {c} {s}",
                  "a {z} {c} {s} {loc}", "{c} {s} on a dark background")
_SPAM = ("click here for more", "best deals today", "free shipping on all orders", "untitled", "download now",
         "subscribe for more", "sunset at the beach", "my cat sleeping", "happy birthday", "view full size",
         "stock photo", "image")
_FILENAMES = ("img_{n}.jpg", "DSC{n}.JPG", "IMG_{n}.png", "photo_{n}.jpeg")
_FILLERS = ("I took these pictures last weekend.", "Here is another one.", "More photos below.",
            "What do you think?", "Thanks for reading!", "This one is my favourite.")
# fmt: on

Obj = dict[str, str]


# ---------------------------------------------------------------------------------------------------------
# objects and captions


def sample_objects(
    rng: np.random.Generator, n: int, *, distinct_colors: bool = False, distinct_shapes: bool = False
) -> list[Obj]:
    """Draw ``n`` objects on distinct grid cells with distinct (colour, shape) pairs.

    Distinct pairs keep references such as "the red circle" unambiguous in relation sentences.
    """
    # permutation/integers rather than rng.choice: several times faster for these tiny draws.
    cells = rng.permutation(9)[:n]
    colors = rng.permutation(len(COLORS))[:n] if distinct_colors else rng.integers(0, len(COLORS), size=n)
    shapes = rng.permutation(len(SHAPES))[:n] if distinct_shapes else rng.integers(0, len(SHAPES), size=n)
    sizes = rng.integers(0, 2, size=n)
    seen: set[tuple[int, int]] = set()
    objects = []
    for i in range(n):
        c, s = int(colors[i]), int(shapes[i])
        while (c, s) in seen:  # only possible when both may repeat; re-drawing the shape suffices
            s = int(rng.integers(len(SHAPES)))
        seen.add((c, s))
        cell = int(cells[i])
        objects.append(
            {
                "shape": SHAPES[s], "color": COLORS[c], "size": SIZES[int(sizes[i])], "row": ROWS[cell // 3],
                "col": COLS[cell % 3],
            }
        )
    return objects


def position_phrase(obj: Obj) -> str:
    """Grid cell as a phrase: "top left", "top", "left", "center", "bottom right", ..."""
    row, col = obj["row"], obj["col"]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


def location(obj: Obj) -> str:
    """Prepositional location: "at the top left", "on the left", "in the center"."""
    phrase = position_phrase(obj)
    if phrase == "center":
        return "in the center"
    return f"on the {phrase}" if phrase in ("left", "right") else f"at the {phrase}"


def _describe(obj: Obj, *, size: bool = True) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}" if size else f"{obj['color']} {obj['shape']}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def main_object(objects: list[Obj]) -> Obj:
    """The largest object; ties go to the first."""
    return next((o for o in objects if o["size"] == "large"), objects[0])


def clean_caption(objects: list[Obj]) -> str:
    """ "a large red circle at the top left and a small blue star in the center." """
    return _join([object_caption(o) for o in objects]) + "."


def object_caption(obj: Obj) -> str:
    """One object only, with its size, colour, shape and place: "a large red star at the top left"."""
    return f"a {_describe(obj)} {location(obj)}"


def long_sentences(objects: list[Obj]) -> list[str]:
    """Count sentence, one sentence per object, then one relation sentence per pair (in list order)."""
    n = len(objects)
    out = [f"There is {_NUMBER[n]} object." if n == 1 else f"There are {_NUMBER[n]} objects."]
    out += [f"A {_describe(o)} is {location(o)}." for o in objects]
    for i in range(n):
        for j in range(i + 1, n):
            a, b = objects[i], objects[j]
            dr = ROWS.index(a["row"]) - ROWS.index(b["row"])
            dc = COLS.index(a["col"]) - COLS.index(b["col"])
            rel = [
                r
                for r in (
                    "above" if dr < 0 else "below" if dr > 0 else "",
                    "left of" if dc < 0 else "right of" if dc > 0 else "",
                )
                if r
            ]
            out.append(
                f"The {_describe(a, size=False)} is {' and '.join(rel)} the {_describe(b, size=False)}."
            )
    return out


def long_caption(objects: list[Obj]) -> str:
    return " ".join(long_sentences(objects))


def raw_caption(rng: np.random.Generator, objects: list[Obj], noise: float = 0.0) -> tuple[str, bool]:
    """Short web-like caption about the main object; with probability ``noise`` wrong or unrelated.

    Returns ``(caption, is_noisy)``. A wrong caption swaps the colour, the shape or both for a pair that is
    not in the image, so it is wrong for every object rather than accidentally right for another one.
    """
    m = main_object(objects)
    template = _RAW_TEMPLATES[int(rng.integers(len(_RAW_TEMPLATES)))]
    noisy = noise > 0 and float(rng.random()) < noise
    color, shape = m["color"], m["shape"]
    if noisy:
        if rng.random() < 0.5:
            present = {(o["color"], o["shape"]) for o in objects}
            mode = int(rng.integers(3))  # 0: colour, 1: shape, 2: both
            while (color, shape) in present:
                if mode != 1:
                    color = COLORS[int(rng.integers(len(COLORS)))]
                if mode != 0:
                    shape = SHAPES[int(rng.integers(len(SHAPES)))]
        elif rng.random() < 0.6:
            return _SPAM[int(rng.integers(len(_SPAM)))], True
        else:
            name = _FILENAMES[int(rng.integers(len(_FILENAMES)))]
            return name.format(n=int(rng.integers(1000, 10000))), True
    return template.format(c=color, s=shape, z=m["size"], loc=location(m)), noisy


def retrieval_captions(objects: list[Obj]) -> list[str]:
    """Five distinct captions: clean, reordered, "a photo of", count-based (all objects), main-object ones."""
    m = main_object(objects)
    n = len(objects)
    noun = "shape" if n == 1 else "shapes"
    candidates = [
        clean_caption(objects), clean_caption(objects[::-1]) if n > 1 else "",
        "a photo of " + clean_caption(objects),
        f"{_NUMBER[n]} {noun} on a noisy background: " + _join([f"a {_describe(o)}" for o in objects]) + ".",
        f"{_describe(m, size=False)} {location(m)}",
        "an image of " + _join([f"a {_describe(o)}" for o in objects]) + ".",
        f"a picture with a {_describe(m)}",
    ]
    out: list[str] = []
    for c in candidates:
        if c and c not in out:
            out.append(c)
    return out[:5]


def swap_colors(objects: list[Obj]) -> list[Obj]:
    """The first two objects with their colours exchanged (the compositional negative)."""
    a, b = dict(objects[0]), dict(objects[1])
    a["color"], b["color"] = objects[1]["color"], objects[0]["color"]
    return [a, b, *objects[2:]]


def vocabulary_corpus() -> list[str]:
    """Every word any caption, document or evaluation prompt can contain (the tokenizer's training text).

    Built from the phrase tables rather than from generated samples, so the vocabulary does not depend on
    the world's size and no generated text ever maps to ``[UNK]`` (digits are split one by one).
    """
    texts = list(_SPAM) + list(_FILLERS) + [f.format(n=1234567890) for f in _FILENAMES]
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                for cell in range(9):
                    o = {
                        "shape": shape, "color": color, "size": size, "row": ROWS[cell // 3],
                        "col": COLS[cell % 3],
                    }
                    texts += [t.format(c=color, s=shape, z=size, loc=location(o)) for t in _RAW_TEMPLATES[:2]]
                    texts.append(clean_caption([o]))
    texts += _RAW_TEMPLATES + tuple(t for ts in ZEROSHOT_TEMPLATES.values() for t in ts)
    a = {"shape": "circle", "color": "red", "size": "large", "row": "top", "col": "left"}
    b = {"shape": "star", "color": "blue", "size": "small", "row": "bottom", "col": "right"}
    c = dict(a, row="bottom", col="center", shape="cross")
    texts += long_sentences([a, b, c]) + long_sentences([a])
    for cell in (0, 1, 2, 3, 5, 6, 7, 8):  # every relation wording, around an object in the center
        texts += long_sentences([dict(b, row=ROWS[cell // 3], col=COLS[cell % 3]), dict(c, row="middle")])
    texts += retrieval_captions([a]) + retrieval_captions([a, b, c])
    return texts


# ---------------------------------------------------------------------------------------------------------
# rendering


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    elif shape == "cross":
        w = 0.36  # arm half-width relative to r
        pts = [
            (w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w),
            (-w, 1),
        ]
        radii = [r * math.hypot(x, y) for x, y in pts]
        angles = [math.atan2(y, x) for x, y in pts]
    else:
        k = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
        start = -math.pi / 2 if shape == "triangle" else (math.pi / 4 if shape == "square" else 0.0)
        radii = [r * (1.1 if shape == "triangle" else 1.0)] * k
        angles = [start + 2 * math.pi * i / k for i in range(k)]
    return [(cx + rad * math.cos(a + angle), cy + rad * math.sin(a + angle)) for rad, a in zip(radii, angles)]


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
# Drawing fresh gaussians per pixel dominated generation time, so pixel noise is a random window of a fixed
# gaussian bank (deterministic: the bank has a constant seed, the window comes from the sample's generator).
_NOISE_BANK = np.random.default_rng(12345).standard_normal(1 << 21, dtype=np.float32)


def _pixel_noise(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    n = shape[0] * shape[1] * shape[2]
    if n * 4 > _NOISE_BANK.size:  # huge images: draw directly
        return rng.standard_normal(shape, dtype=np.float32)
    start = int(rng.integers(0, _NOISE_BANK.size - n))
    return _NOISE_BANK[start : start + n].reshape(shape)


def _clip8(v: float) -> int:
    return min(255, max(0, int(v)))


def render_sample(rng: np.random.Generator, objects: list[Obj], image_size: int = 64) -> Image.Image:
    """Draw ``objects`` on a noisy background: grey-ish base, faint lines, a gradient, gaussian pixel noise.

    Large objects are drawn first so that a small object on an overlapping cell stays visible.
    """
    s = image_size
    # One vectorised draw of every uniform this image needs (per-call generator overhead dominated).
    u = iter(rng.random(8 + 6 * 3 + 3 * len(objects) + 1).tolist())
    grey = 25 + 85 * next(u)
    base = [_clip8(grey + 30 * next(u) - 15) for _ in range(3)]
    img = Image.new("RGB", (s, s), tuple(base))
    draw = ImageDraw.Draw(img)
    for _ in range(int(4 * next(u))):  # 0-3 faint distractor lines and blobs in the background's hue
        shift = 60 * next(u) - 30
        tone = tuple(_clip8(b + shift) for b in base)
        x0, y0, x1, y1 = (s * next(u) for _ in range(4))
        if next(u) < 0.6:
            draw.line((x0, y0, x1, y1), fill=tone, width=max(1, s // 32))
        else:
            rad = (0.05 + 0.1 * x1 / s) * s
            draw.ellipse((x0 - rad, y0 - rad, x0 + rad, y0 + rad), fill=tone)
    for o in sorted(objects, key=lambda o: o["size"] != "large"):
        cx = (COLS.index(o["col"]) + 0.5 + 0.3 * (next(u) - 0.5)) * s / 3  # jitter: +-5% of the side
        cy = (ROWS.index(o["row"]) + 0.5 + 0.3 * (next(u) - 0.5)) * s / 3
        angle = 0.4 * (next(u) - 0.5)
        r = SIZE_FRACTION[o["size"]] * s / 2
        fill = COLOR_RGB[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, r, angle), fill=fill)
    if s not in _GRIDS:
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1) - 0.5
        _GRIDS[s] = (xs[..., None], ys[..., None])
    xs, ys = _GRIDS[s]
    gx, gy, sigma = 50 * next(u) - 25, 50 * next(u) - 25, 5 + 9 * next(u)
    arr = np.asarray(img, dtype=np.float32)
    arr += gx * xs + gy * ys
    arr += _pixel_noise(rng, (s, s, 3)) * sigma
    np.clip(arr, 0, 255, out=arr)
    return Image.fromarray(arr.astype(np.uint8))


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0)  # 4:4:4 keeps small objects' colours crisp
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------
# samples


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[split], index])


def make_train_sample(seed: int, index: int, *, noise: float = 0.0, image_size: int = 64) -> dict[str, Any]:
    """One training sample ``{"__key__", "jpg", "txt", "json"}``."""
    rng = _rng(seed, "train", index)
    objects = sample_objects(rng, int(rng.integers(1, 4)))
    jpg = _jpeg(render_sample(rng, objects, image_size))
    raw, noisy = raw_caption(rng, objects, noise)
    meta = {
        "raw": raw, "raw_is_noisy": noisy, "clean": clean_caption(objects), "long": long_caption(objects),
        "objects": objects,
    }
    return {"__key__": f"{index:08d}", "jpg": jpg, "txt": raw, "json": json.dumps(meta)}


def make_document(seed: int, index: int, *, image_size: int = 64) -> dict[str, Any]:
    """One MMC4-style interleaved document: ``json`` with text_list/image_info, members ``img<k>.jpg``."""
    rng = _rng(seed, "docs", index)
    sample: dict[str, Any] = {"__key__": f"{index:08d}"}
    text: list[str] = []
    info: list[dict[str, Any]] = []
    for k in range(int(rng.integers(2, 5))):
        objects = sample_objects(rng, int(rng.integers(1, 4)))
        sample[f"img{k}.jpg"] = _jpeg(render_sample(rng, objects, image_size))
        if rng.random() < 0.25:
            text.append(_FILLERS[int(rng.integers(len(_FILLERS)))])
        # Object and relation sentences of the long caption (the count sentence would not identify the
        # image), always including one object sentence.
        sentences = long_sentences(objects)[1:]
        chosen = {int(rng.integers(len(objects)))}
        others = [i for i in range(len(sentences)) if i not in chosen]
        extra = int(rng.integers(0, min(2, len(others)) + 1))
        chosen.update(int(i) for i in rng.choice(others, size=extra, replace=False))
        info.append(
            {
                "image_name": f"img{k}.jpg", "matched_text_index": len(text), "matched_sim": 1.0,
                "objects": objects,
            }
        )
        text += [sentences[i] for i in sorted(chosen)]
    if rng.random() < 0.25:
        text.append(_FILLERS[int(rng.integers(len(_FILLERS)))])
    sample["json"] = json.dumps({"text_list": text, "image_info": info})
    return sample


def zeroshot_classes(name: str) -> tuple[list[str], tuple[str, ...]]:
    """Class names and prompt templates of a zero-shot set."""
    if name == "zeroshot_shape":
        return list(SHAPES), ZEROSHOT_TEMPLATES["noun"]
    if name == "zeroshot_color":
        return list(COLORS), ZEROSHOT_TEMPLATES["color"]
    if name == "zeroshot_color_shape":
        return [f"{c} {s}" for c in COLORS for s in SHAPES], ZEROSHOT_TEMPLATES["noun"]
    raise ValueError(
        f"unknown zero-shot set {name!r}; known: zeroshot_shape, zeroshot_color, zeroshot_color_shape"
    )


def make_eval_sample(
    name: str, seed: int, index: int, label: int = 0, *, image_size: int = 64
) -> dict[str, Any]:
    """One sample of evaluation set ``name``; ``label`` is the class index for zero-shot sets."""
    rng = _rng(seed, name, index)
    key = f"{index:08d}"
    if name.startswith("zeroshot_"):
        o = sample_objects(rng, 1)[0]
        if name == "zeroshot_shape":
            o["shape"] = SHAPES[label]
        elif name == "zeroshot_color":
            o["color"] = COLORS[label]
        else:
            o["color"], o["shape"] = COLORS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
        jpg = _jpeg(render_sample(rng, [o], image_size))
        return {"__key__": key, "jpg": jpg, "cls": str(label), "json": json.dumps({"objects": [o]})}
    if name == "retrieval":
        objects = sample_objects(rng, int(rng.integers(1, 4)))
        meta: dict[str, Any] = {"captions": retrieval_captions(objects), "objects": objects}
    elif name == "retrieval_long":
        # One long caption per image (every object, its size and place, and the relations): the
        # long-caption retrieval of DreamLIP and LLM2CLIP. Same reader as ``retrieval``.
        objects = sample_objects(rng, int(rng.integers(1, 4)))
        meta = {"captions": [long_caption(objects)], "objects": objects}
    elif name == "retrieval_multi":
        # 2-3 distinguishable objects, one caption per object naming only it: several distinct true
        # captions per image (caption-conditioned embeddings). A caption text recurs across images, so
        # the set is evaluated by text (``SET_META``). Same reader as ``retrieval``.
        objects = sample_objects(rng, int(rng.integers(2, 4)), distinct_colors=True, distinct_shapes=True)
        meta = {"captions": [object_caption(o) for o in objects], "objects": objects}
    elif name == "compositional":
        objects = sample_objects(rng, 2, distinct_colors=True, distinct_shapes=True)
        meta = {
            "positive": clean_caption(objects), "negative": clean_caption(swap_colors(objects)),
            "objects": objects,
        }
    else:
        raise ValueError(f"unknown evaluation set {name!r}; known: {', '.join(DEFAULT_EVAL_SIZES)}")
    return {"__key__": key, "jpg": _jpeg(render_sample(rng, objects, image_size)), "json": json.dumps(meta)}


# ---------------------------------------------------------------------------------------------------------
# the world on disk


_CHUNK = 250  # samples per unit of work handed to a worker process


def _make_chunk(job: tuple[str, int, int, int, float, int, list[int]]) -> tuple[str, list[dict[str, Any]]]:
    """Samples ``start..stop`` of one split (run in worker processes; module-level for pickling)."""
    split, seed, start, stop, noise, image_size, labels = job
    if split == "train":
        out = [make_train_sample(seed, i, noise=noise, image_size=image_size) for i in range(start, stop)]
    elif split == "docs":
        out = [make_document(seed, i, image_size=image_size) for i in range(start, stop)]
    else:
        out = [
            make_eval_sample(split, seed, i, labels[i - start], image_size=image_size)
            for i in range(start, stop)
        ]
    return split, out


def _write_split(samples: Iterator[dict[str, Any]], folder: Path, shard_size: int, bar: tqdm) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    with ShardWriter(str(folder / "%05d.tar"), max_count=shard_size) as writer:
        for sample in samples:
            writer.write(sample)
            name = os.path.basename(writer.shards[-1])
            counts[name] = counts.get(name, 0) + 1
            bar.update(sum(1 for k in sample if k.endswith("jpg")))
    # open_clip-style per-folder sizes (shard file name -> samples), for loaders that want epoch lengths.
    (folder / "sizes.json").write_text(json.dumps(counts, indent=1))
    return writer.total


def _bounded_imap(pool: Any, jobs: list[Any], ahead: int) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Ordered ``pool.imap(_make_chunk, jobs)`` with at most ``ahead`` chunks in flight (bounded memory)."""
    pending: collections.deque[Any] = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(_make_chunk, (job,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def default_workers() -> int:
    """Worker processes for generation: the usable CPU cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def generate_world(
    root: str | Path, *, seed: int = 0, train_samples: int = 20000, docs: int = 2000, noise: float = 0.0,
    image_size: int = 64, shard_size: int = 1000, eval_sizes: dict[str, int] | None = None,
    progress: bool = True, workers: int = 1,
) -> Path:
    """Write the shapes world into ``root`` (created; existing files are overwritten) and return it.

    Layout: ``train/`` and ``docs/`` shards, ``eval/<set>/`` shards (plus ``classes.json`` for zero-shot
    sets and ``set.json`` for the sets of :data:`SET_META`), ``tokenizer.json``, ``sizes.json`` (samples
    per split) and ``world.json`` (parameters; written last, so its presence marks a complete world). An
    evaluation size of 0 leaves that set out. The output is identical for any ``workers`` (every sample has
    its own seed; chunks are written in order).
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"shapes world noise must be in [0, 1], got {noise}")
    if image_size < 16 or shard_size < 1 or train_samples < 0 or docs < 0:
        raise ValueError(
            f"shapes world: bad sizes (image_size={image_size} >= 16, shard_size={shard_size} >= 1, "
            f"train_samples={train_samples} >= 0, docs={docs} >= 0)"
        )
    unknown = set(eval_sizes or {}) - set(DEFAULT_EVAL_SIZES)
    if unknown:
        raise ValueError(
            f"eval_sizes: unknown set(s) {sorted(unknown)}; known: {', '.join(DEFAULT_EVAL_SIZES)}"
        )
    evals = {k: v for k, v in {**DEFAULT_EVAL_SIZES, **(eval_sizes or {})}.items() if v > 0}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    log.info("generating the shapes world into %s", root)
    folders = {"train": root / "train", "docs": root / "docs", **{k: root / "eval" / k for k in evals}}
    counts = {"train": train_samples, "docs": docs, **evals}
    jobs = []
    for split, n in counts.items():
        labels = [0] * n
        if split.startswith("zeroshot_"):
            classnames, templates = zeroshot_classes(split)
            # Balanced classes (counts differ by at most one), in a seeded random order.
            labels = (
                np.random.default_rng([seed, _STREAMS[split]])
                .permutation(np.arange(n) % len(classnames))
                .tolist()
            )
            folders[split].mkdir(parents=True, exist_ok=True)
            (folders[split] / "classes.json").write_text(
                json.dumps({"classnames": classnames, "templates": list(templates)}, indent=1)
            )
        if split in SET_META:
            folders[split].mkdir(parents=True, exist_ok=True)
            (folders[split] / "set.json").write_text(json.dumps(SET_META[split], indent=1))
        jobs += [
            (split, seed, a, min(a + _CHUNK, n), noise, image_size, labels[a : a + _CHUNK])
            for a in range(0, n, _CHUNK)
        ]
    sizes = dict.fromkeys(counts, 0)
    total = train_samples + 3 * docs + sum(evals.values())  # a document holds 3 images on average
    # fork: children only run numpy/PIL code, and start instantly (spawn would re-import the caller).
    use_pool = workers > 1 and len(jobs) > 1 and "fork" in mp.get_all_start_methods()
    pool = mp.get_context("fork").Pool(workers) if use_pool else None
    try:
        results = _bounded_imap(pool, jobs, 2 * workers) if pool is not None else map(_make_chunk, jobs)
        with tqdm(total=total, desc="shapes world", unit="img", disable=not progress, leave=False) as bar:
            for split, group in itertools.groupby(results, key=lambda r: r[0]):
                sizes[split] = _write_split(
                    (s for _, chunk in group for s in chunk), folders[split], shard_size, bar
                )
    finally:
        if pool is not None:
            pool.terminate()
    from vlp_core.data.tokenizer import train_word_tokenizer  # lazy: keeps torch out of worker imports

    train_word_tokenizer(vocabulary_corpus(), root / "tokenizer.json")
    (root / "sizes.json").write_text(json.dumps(sizes, indent=1))
    params = {
        "generator": "vlp_core.data.synthetic", "version": WORLD_VERSION, "seed": seed,
        "train_samples": train_samples, "docs": docs, "noise": noise, "image_size": image_size,
        "shard_size": shard_size, "eval_sizes": evals, "shapes": list(SHAPES), "colors": list(COLORS),
        "sizes": SIZE_FRACTION, "color_shape_class": "color_idx * 6 + shape_idx",
    }
    (root / "world.json").write_text(json.dumps(params, indent=1))
    return root


def default_world_dir(
    seed: int = 0, noise: float = 0.0, train_samples: int = 20000, image_size: int = 64
) -> Path:
    """``$VLP_CACHE`` (else ``~/.cache/vlp``) / ``shapes-v<version>-s<seed>-n<noise>-t<train>-i<size>``."""
    cache = Path(os.environ.get("VLP_CACHE") or Path.home() / ".cache" / "vlp")
    return cache / f"shapes-v{WORLD_VERSION}-s{seed}-n{noise:g}-t{train_samples}-i{image_size}"


def is_world(root: str | Path) -> bool:
    """Whether ``root`` holds a complete shapes world (``world.json`` is written last)."""
    return (Path(root) / "world.json").is_file()


def generate_world_atomic(root: str | Path, *, replace: bool = False, **kwargs: Any) -> Path:
    """Generate into a temporary sibling folder and rename it to ``root``, under a file lock.

    Another process (a torchrun rank) that wants the same world waits on the lock and then finds it
    complete. ``replace`` regenerates an existing world. A non-empty ``root`` that is not a world is refused.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_world(root) and not replace:
            return root
        if root.exists() and not is_world(root) and any(root.iterdir()):
            raise ValueError(
                f"{root} exists and is not a shapes world (no world.json); choose another folder"
            )
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_world(tmp, **kwargs)
            if root.exists():
                old = root.parent / f".{root.name}.old-{os.getpid()}"
                os.replace(root, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.remove(root.parent / f".{root.name}.lock")
    return root


def ensure_world(cfg: DataConfig) -> Path:
    """The shapes world of ``cfg`` (``world_dir`` or the default cache folder), generated if absent."""
    root = (
        Path(cfg.world_dir)
        if cfg.world_dir
        else default_world_dir(cfg.world_seed, cfg.world_noise, cfg.world_train_samples)
    )
    if not is_world(root):
        generate_world_atomic(
            root, seed=cfg.world_seed, train_samples=cfg.world_train_samples, noise=cfg.world_noise,
            workers=default_workers(),
        )
    params = json.loads((root / "world.json").read_text())
    wanted = {"seed": cfg.world_seed, "noise": cfg.world_noise, "train_samples": cfg.world_train_samples}
    differ = {k: (params.get(k), v) for k, v in wanted.items() if params.get(k) != v}
    if differ:
        log.warning(
            "shapes world %s was generated with other parameters (found, configured): %s", root, differ
        )
    return root
