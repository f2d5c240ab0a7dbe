"""Offline embedding extraction (``llm2clip-embed``) and the keyed index stage 2 reads.

Layout of an output folder (never inside the input shards' pattern: only ``.npy``/``.json`` files)::

    manifest.json                 the run record: text model (path and content fingerprint), its pooling
                                  settings, context length, caption instruction, caption keys, dim, dtype
    <stem>-<h8>.json              per shard: source path, size, mtime, sample keys, missing rows per field
    <stem>-<h8>.<field>.npy       per shard and caption key: [n_samples, E] embeddings in sample order

``<h8>`` hashes the shard's resolved path, so equal stems from different folders never collide. A shard's
files are written to temporaries and renamed, its ``.json`` last: a shard is done exactly when its ``.json``
exists and matches the source's size and mtime. A re-run skips done shards (so it is resumable and never
grows), redoes changed or half-written ones, and computes each in fixed batches in file order (so a redone
shard is bit-identical). Under torchrun, rank r embeds shards r, r+W, ...

Stage 2 compares the record with its run before the first step (:func:`check_embeddings`): the text model
(same folder, same content), its pooling settings, ``model.text.context_length`` and
``loss.caption_instruction`` must all match, else a one-line error says what differs and how to fix it. A
folder written before the record existed (manifest format 1) is refused with the advice to re-run
llm2clip-embed: such embeddings cannot be checked, and a silent mismatch costs a whole training run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlp_core.data.adapters import read_caption
from vlp_core.data.tario import expand_urls, iter_samples
from vlp_core.method import SkipSample

__all__ = ["embed_shards", "EmbeddingIndex", "shard_name", "MANIFEST", "field_tag", "text_model_fingerprint",
           "run_record", "check_embeddings", "FORMAT_VERSION"]

log = logging.getLogger("vlp")

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the run record (fingerprint, instruction); 1 had text model path, settings, context
_HASHED_BYTES = 64 << 20  # files up to this size are hashed whole (configs, tokenizers); larger: name + size


def shard_name(url: str) -> str:
    real = os.path.realpath(url)
    stem = Path(real).name.split(".")[0]
    return f"{stem}-{hashlib.sha1(real.encode()).hexdigest()[:8]}"


def field_tag(key: str) -> str:
    """A caption key as a file-name part (``json.long`` -> ``json_long``)."""
    return key.replace(".", "_").replace("/", "_")


def _source_stamp(url: str) -> dict[str, int]:
    st = os.stat(url)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _shard_done(out: Path, url: str, keys: Sequence[str]) -> bool:
    meta_path = out / f"{shard_name(url)}.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return False
    files_ok = all((out / f"{shard_name(url)}.{field_tag(k)}.npy").is_file() for k in keys)
    return files_ok and meta.get("source_stamp") == _source_stamp(url) and meta.get("fields") == list(keys)


def _check_output(out: Path, urls: list[str]) -> None:
    out_real = os.path.realpath(out)
    for url in urls:
        real = os.path.realpath(url)
        if real.startswith(out_real + os.sep):
            raise ValueError(f"input shard {url} lies inside the output folder {out}: choose another --out")
        if not real.endswith(".tar"):
            raise ValueError(f"input {url} is not a .tar shard")


def text_model_fingerprint(folder: str | Path) -> str:
    """A content fingerprint of a text model folder: the bytes of its small files (config, tokenizer,
    ``llm2clip.json``) and the name and size of its large ones (weights). A re-export into the same folder
    changes it."""
    h = hashlib.sha1()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        if size <= _HASHED_BYTES:
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def run_record(text_model: str, settings: Any, context_length: int, instruction: str) -> dict[str, Any]:
    """The facts stage 2 must share with the embeddings (stored in the manifest, compared at the start)."""
    from dataclasses import asdict

    return {"format": FORMAT_VERSION, "text_model": os.path.realpath(text_model),
            "text_model_fingerprint": text_model_fingerprint(text_model), "settings": asdict(settings),
            "context_length": int(context_length), "instruction": instruction}


def _manifest(record: dict[str, Any], keys: list[str], dim: int, dtype: str) -> dict:
    return {**record, "caption_keys": keys, "dim": dim, "dtype": dtype}


def check_embeddings(manifest: dict[str, Any], expected: dict[str, Any], folder: str | Path) -> None:
    """Raise a one-line ``ValueError`` unless ``manifest`` records the run facts ``expected`` (a
    :func:`run_record` of the stage-2 run)."""
    if manifest.get("format") != FORMAT_VERSION or "instruction" not in manifest:
        raise ValueError(f"loss.embeddings {folder} was written by an older llm2clip-embed (manifest format "
                         f"{manifest.get('format')}, no run record to check against this run): re-run "
                         "llm2clip-embed into a new --out folder")
    names = {"text_model": "text model (loss.text_model)", "text_model_fingerprint": "text model content",
             "settings": "pooling settings (llm2clip.json)", "context_length": "context length "
             "(model.text.context_length)", "instruction": "caption instruction (loss.caption_instruction)"}
    diffs = [f"{names[k]}: embeddings {manifest.get(k)!r}, run {v!r}" for k, v in expected.items()
             if k in names and manifest.get(k) != v]
    if diffs:
        raise ValueError(f"loss.embeddings {folder} does not match this run ({'; '.join(diffs)}): re-run "
                         "llm2clip-embed with the run's text model, --context-length and --instruction into a "
                         "new --out folder")


def embed_shards(pattern: str, out: str | Path, *, text_model: str, caption_keys: Sequence[str],
                 context_length: int = 77, batch_size: int = 64, dtype: str = "float32",
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 progress: bool = False, instruction: str = "") -> dict[str, int]:
    """Embed every ``caption_keys`` caption of every sample of ``pattern`` into ``out`` (see module doc),
    each with ``instruction`` before it (attended to, not pooled; LLM2CLIP uses none).

    Returns counts: ``shards_done`` (computed now), ``shards_skipped`` (already complete), ``samples``.
    """
    from vlp_core.data.tokenizer import Tokenizer
    from vlp_llm2clip.encoder import load_encoder

    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    keys = [k.strip() for k in caption_keys if k.strip()]
    if not keys:
        raise ValueError("no caption keys to embed")
    urls = expand_urls(pattern)
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} names no shard")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise ValueError(f"{len(missing)} input shard(s) not found, e.g. {missing[0]}")
    out = Path(out)
    _check_output(out, urls)
    out.mkdir(parents=True, exist_ok=True)
    encoder = load_encoder(text_model, dtype=torch.float32).eval().to(device)
    encoder.requires_grad_(False)
    tokenizer = Tokenizer.from_pretrained(text_model, context_length=context_length)
    record = run_record(text_model, encoder.settings, tokenizer.context_length, instruction)
    manifest = _manifest(record, keys, encoder.width, dtype)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old != manifest:
            diff = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise ValueError(f"{out} holds embeddings made with other settings ({', '.join(diff)}): "
                             "use another --out")
    elif rank == 0:
        _atomic_write(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    counts = {"shards_done": 0, "shards_skipped": 0, "samples": 0}
    mine = urls[rank::world_size]
    for url in mine:
        if _shard_done(out, url, keys):
            counts["shards_skipped"] += 1
            continue
        n = _embed_one(url, out, encoder, tokenizer, keys, batch_size, np.dtype(dtype), device, progress,
                       instruction)
        counts["shards_done"] += 1
        counts["samples"] += n
    return counts


def _embed_one(url: str, out: Path, encoder: Any, tokenizer: Any, keys: list[str], batch_size: int,
               dtype: np.dtype, device: Any, progress: bool, instruction: str) -> int:
    import random

    stamp = _source_stamp(url)
    sample_keys: list[str] = []
    texts: dict[str, list[str]] = {k: [] for k in keys}
    absent: dict[str, list[int]] = {k: [] for k in keys}
    rng = random.Random(0)  # list-valued fields: a fixed choice (the index stores one vector per field)
    for i, sample in enumerate(iter_samples(url)):
        sample_keys.append(sample["__key__"])
        for k in keys:
            try:
                texts[k].append(read_caption(sample, k, rng))
            except SkipSample:
                texts[k].append("")
                absent[k].append(i)
    name = shard_name(url)
    for k in keys:
        # Batches of similar length (less padding); a fixed order, so a redone shard is bit-identical.
        order = sorted(range(len(texts[k])), key=lambda i: (len(texts[k][i]), i))
        array = np.zeros((len(order), encoder.width), np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            with torch.no_grad():
                tokens = tokenizer([texts[k][i] for i in idx]).to(device)
                array[idx] = encoder.forward_tokens(tokens, tokenizer, instruction=instruction).cpu().numpy()
        array[absent[k]] = 0.0
        _atomic_write(out / f"{name}.{field_tag(k)}.npy", _npy_bytes(array.astype(dtype)))
    meta = {"source": os.path.realpath(url), "source_stamp": stamp, "fields": keys, "keys": sample_keys,
            "absent": absent}
    _atomic_write(out / f"{name}.json", (json.dumps(meta) + "\n").encode())
    if progress:
        log.info("embedded %s: %d samples", url, len(sample_keys))
    return len(sample_keys)


class EmbeddingIndex:
    """Read side: ``lookup(url, key, field) -> float32 [E]``; shards are opened lazily (memory-mapped)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ValueError(f"{folder} is not an llm2clip-embed output folder (no {MANIFEST})")
        self.manifest = json.loads(path.read_text())
        self._shards: dict[str, tuple[dict[str, int], dict[str, set[int]], dict[str, np.ndarray]]] = {}

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def caption_keys(self) -> list[str]:
        return list(self.manifest["caption_keys"])

    def _open(self, url: str):
        if url not in self._shards:
            name = shard_name(url)
            meta_path = self.folder / f"{name}.json"
            if not meta_path.is_file():
                raise SkipSample("missing_embeddings", f"no embeddings for shard {url} in {self.folder}")
            meta = json.loads(meta_path.read_text())
            rows = {k: i for i, k in enumerate(meta["keys"])}
            absent = {f: set(v) for f, v in meta["absent"].items()}
            arrays = {f: np.load(self.folder / f"{name}.{field_tag(f)}.npy", mmap_mode="r") for f in meta["fields"]}
            self._shards[url] = (rows, absent, arrays)
        return self._shards[url]

    def lookup(self, url: str, key: str, field: str) -> torch.Tensor:
        rows, absent, arrays = self._open(url)
        if field not in arrays:
            raise ValueError(f"embeddings in {self.folder} have no field {field!r} (have {sorted(arrays)})")
        row = rows.get(key)
        if row is None:
            raise SkipSample("missing_embedding", f"sample {key} of {url}")
        if row in absent.get(field, ()):
            raise SkipSample("empty_caption", f"sample {key} has no {field}")
        return torch.from_numpy(np.array(arrays[field][row], dtype=np.float32))
