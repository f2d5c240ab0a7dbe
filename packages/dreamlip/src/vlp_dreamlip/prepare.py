"""``dreamlip-prepare``: the official caption CSV plus local images -> webdataset shards.

Each sample gets ``jpg``, ``txt`` (= ``raw_caption``) and ``json`` with every CSV column under its own name
(``raw_caption``, ``shortIB_captions``, ``longIB_captions``, ``shortSV_captions``, ``longSV_captions``,
``shortLLA_captions``, ``longLLA_captions``, ``Image Path``) plus ``key``: the keys
:data:`vlp_dreamlip.config.RELEASE_CAPTION_KEYS` reads. The HF release lists image URLs instead of paths;
download those with img2dataset, which writes the same keys (see the README), and skip this tool.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlp_core.data.convert import convert_table, read_rows

__all__ = ["RELEASE_COLUMNS", "prepare", "main"]

RELEASE_COLUMNS = ("Image Path", "raw_caption", "shortIB_captions", "longIB_captions", "shortSV_captions",
                   "longSV_captions", "shortLLA_captions", "longLLA_captions")

_IMG2DATASET = (
    "img2dataset --url_list {csv} --input_format csv --url_col 'Image Path' --caption_col raw_caption "
    "--save_additional_columns '[shortIB_captions,longIB_captions,shortSV_captions,longSV_captions,"
    "shortLLA_captions,longLLA_captions]' --output_format webdataset --output_folder OUT"
)


def prepare(csv_path: str | Path, images: str | Path, out: str | Path, *, shard_size: int = 1000,
            progress: bool = True):
    """Check the release columns, then write ``out/{00000..}.tar`` (see the module docstring).

    Raises:
        ValueError: Missing file or columns, or URLs in ``Image Path`` (download them with img2dataset).
    """
    rows = read_rows(csv_path, required=RELEASE_COLUMNS)
    first = next(rows, None)
    if first is None:
        raise ValueError(f"{csv_path}: no rows")
    if str(first["Image Path"]).strip().lower().startswith(("http://", "https://")):
        raise ValueError(
            f"{csv_path}: 'Image Path' holds URLs ({first['Image Path'][:60]}...); download them with "
            f"img2dataset, which writes the same sample keys:\n  {_IMG2DATASET.format(csv=csv_path)}")
    if not Path(images).is_dir():
        raise ValueError(f"images folder {images} does not exist")
    return convert_table(csv_path, out, image_col="Image Path", caption_col="raw_caption",
                         shard_size=shard_size, base_dir=images, progress=progress)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dreamlip-prepare",
        description="Convert the DreamLIP caption CSV (columns: " + ", ".join(RELEASE_COLUMNS) + ") and the "
        "images it names into webdataset shards OUT/{00000..}.tar for dreamlip-train --train-data. Rows whose "
        "image is missing or unreadable, or whose raw caption is empty, are skipped and reported.")
    p.add_argument("csv", type=Path, help="the caption CSV, e.g. cc3m_3long_3short_1raw_captions.csv")
    p.add_argument("--images", type=Path, required=True, help="folder that the 'Image Path' entries start from")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        stats = prepare(args.csv, args.images, args.out, shard_size=args.shard_size,
                        progress=not args.no_progress)
    except ValueError as e:
        print(f"dreamlip-prepare: error: {e}", file=sys.stderr)
        return 2
    print(stats.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
