"""Convert a table of local image paths and captions (CSV or JSONL) into img2dataset-style shards.

Each output sample has ``jpg`` (the source bytes when the source is a JPEG, else re-encoded at quality 95),
``txt`` (the caption) and ``json`` (every field of the row plus ``key``). Rows whose image is missing or
undecodable, or whose caption is empty, are skipped and counted by reason.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vlp_core.data.tario import ShardWriter

__all__ = ["ConvertStats", "convert_table", "read_rows"]


@dataclass
class ConvertStats:
    """What a conversion wrote and skipped."""

    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few offending entries

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples.setdefault(reason, [])) < 3:
            self.examples[reason].append(example)

    def summary(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"wrote {self.written} samples into {len(self.shards)} shard(s)"]
        total = sum(self.skipped.values())
        if total:
            lines.append(f"skipped {total} row(s):")
            for reason, n in self.skipped.most_common():
                lines.append(f"  {n} x {reason}, e.g. {', '.join(self.examples[reason])}")
        return "\n".join(lines)


def read_rows(path: str | Path, *, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """Yield rows of a ``.csv`` (header line) or ``.jsonl`` file as dicts.

    Raises:
        ValueError: Missing file, unknown extension, bad JSON line, or a required column absent from the
            CSV header / the first JSONL row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise ValueError(f"{path}: column(s) {missing} not found; columns are {header}")
            yield from reader
    elif suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            first = True
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}"
                    )
                if first:
                    missing = [c for c in required if c not in row]
                    if missing:
                        raise ValueError(
                            f"{path}:{lineno}: field(s) {missing} not found; fields are {list(row)}"
                        )
                    first = False
                yield row
    else:
        raise ValueError(
            f"input file {path}: expected a .csv or .jsonl file, got '{suffix or 'no extension'}'"
        )


def _count_rows(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            n = sum(1 for line in f if line.strip())
        return n - 1 if path.suffix.lower() == ".csv" else n
    except OSError:
        return None


def _load_jpeg(file: Path) -> bytes:
    """JPEG bytes of ``file``: unchanged for JPEGs, else decoded and re-encoded. Raises ValueError."""
    data = file.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # skipped in training anyway
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            img.load()  # full decode, so truncated files are caught here rather than in training
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    if fmt == "JPEG":
        return data
    if img.mode in ("RGBA", "LA", "P"):
        # Composite transparency on white (JPEG has no alpha; a plain convert would turn it black).
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def convert_table(
    input_path: str | Path, out_dir: str | Path, *, image_col: str = "image", caption_col: str = "caption",
    shard_size: int = 1000, base_dir: str | Path | None = None, progress: bool = True,
) -> ConvertStats:
    """Write shards ``out_dir/{00000..}.tar`` and ``out_dir/sizes.json`` from a CSV/JSONL table.

    Args:
        input_path: ``.csv`` with a header line, or ``.jsonl`` with one object per line.
        out_dir: Output folder (created).
        image_col: Column holding the image path; relative paths resolve against ``base_dir``.
        caption_col: Column holding the caption.
        shard_size: Samples per shard.
        base_dir: Folder for relative image paths; default the input file's folder.
        progress: Show a tqdm bar.

    Raises:
        ValueError: Missing input, missing column, bad JSONL line or bad ``shard_size``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    input_path = Path(input_path)
    base = Path(base_dir) if base_dir is not None else input_path.parent
    if base_dir is not None and not base.is_dir():
        raise ValueError(f"base dir {base} does not exist")
    rows = read_rows(input_path, required=(image_col, caption_col))
    # Pull the first row now so that a missing file or column fails before anything is written.
    first = next(rows, None)
    rows = itertools.chain([first], rows) if first is not None else iter(())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = ConvertStats()
    counts: dict[str, int] = {}
    with (
        ShardWriter(str(out / "%05d.tar"), max_count=shard_size) as writer,
        tqdm(total=_count_rows(input_path), desc="convert", unit="row", disable=not progress) as bar,
    ):
        for i, row in enumerate(rows):
            bar.update(1)
            image = str(row.get(image_col) or "").strip()
            caption = row.get(caption_col)
            caption = "" if caption is None else str(caption).strip()
            if not caption:
                stats.skip("empty caption", f"row {i} ({image or 'no image'})")
                continue
            if not image:
                stats.skip("missing image path", f"row {i}")
                continue
            file = Path(image).expanduser()
            file = file if file.is_absolute() else base / file
            if not file.is_file():
                stats.skip("missing image file", str(file))
                continue
            try:
                jpg = _load_jpeg(file)
            except ValueError as e:
                stats.skip("undecodable image", f"{file} ({e})")
                continue
            key = f"{writer.total:09d}"
            meta = {**row, "key": key}
            writer.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta, default=str)})
            shard = os.path.basename(writer.shards[-1])
            counts[shard] = counts.get(shard, 0) + 1
    stats.written = writer.total
    stats.shards = list(writer.shards)
    # open_clip convention: shard file name -> number of samples.
    (out / "sizes.json").write_text(json.dumps(counts, indent=1))
    return stats
