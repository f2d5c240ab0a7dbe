"""``vlp-data``: generate the shapes world, convert image-caption tables to shards, inspect shards."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vlp-data`` (subcommands synth, convert, info)."""
    parser = argparse.ArgumentParser(
        prog="vlp-data",
        description="Data tools for vlp: the synthetic shapes world, table-to-shard "
        "conversion and shard inspection. Run 'vlp-data COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "synth",
        help="generate the shapes world (train/docs shards, eval sets, tokenizer)",
        description="Generate the shapes world: train/ and docs/ shards, eval/<set>/ shards, "
        "tokenizer.json, sizes.json and world.json. An existing complete world is kept unless "
        "--force is given.",
    )
    p.add_argument(
        "--out", type=Path, default=None,
        help="output folder (default: $VLP_CACHE or ~/.cache/vlp, then shapes-v*-s<seed>-...)",
    )
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--train-samples", type=int, default=20000, help="training images (default 20000)")
    p.add_argument("--docs", type=int, default=2000, help="interleaved documents (default 2000)")
    p.add_argument(
        "--noise", type=float, default=0.0,
        help="fraction of wrong or unrelated raw captions, in [0, 1] (default 0)",
    )
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--workers", type=int, default=None,
        help="worker processes (default: usable CPU cores, at most 4); the output does not depend on it",
    )
    p.add_argument(
        "--eval-size", type=int, default=None,
        help="images per evaluation set (default: 996/1000/960 zero-shot, 1000 retrieval, 500 compositional, "
        "1000 long-caption retrieval)",
    )
    p.add_argument("--force", action="store_true", help="regenerate even if the folder holds a world")

    p = sub.add_parser(
        "convert",
        help="convert a CSV/JSONL of local image paths and captions into shards",
        description="Write img2dataset-style shards OUT/{00000..}.tar (members jpg, txt, json) "
        "and OUT/sizes.json from a table of local image paths and captions. JPEG files are "
        "stored as is, other formats re-encoded as JPEG. Rows with a missing or undecodable "
        "image or an empty caption are skipped and reported; extra columns go into json.",
    )
    p.add_argument("input", type=Path, help="a .csv file with a header line, or a .jsonl file")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards")
    p.add_argument("--image-col", default="image", help="column with the image path (default 'image')")
    p.add_argument("--caption-col", default="caption", help="column with the caption (default 'caption')")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--base-dir", type=Path, default=None,
        help="folder that relative image paths start from (default: the input file's folder)",
    )

    p = sub.add_parser(
        "info",
        help="count samples and member extensions in shards",
        description="Count samples and member extensions of the shards in a folder (*.tar, "
        "recursively) or of a brace pattern such as 'dir/{00000..00009}.tar'.",
    )
    p.add_argument("target", help="a folder, a .tar file or a brace pattern")
    return parser


def _eval_sizes(size: int | None) -> dict[str, int] | None:
    from vlp_core.data.synthetic import DEFAULT_EVAL_SIZES

    if size is None:
        return None
    if size <= 0:
        raise ValueError(f"--eval-size must be positive, got {size}")
    return {name: size for name in DEFAULT_EVAL_SIZES}


def _synth(args: argparse.Namespace) -> int:
    from vlp_core.data.synthetic import default_workers, default_world_dir, generate_world_atomic, is_world

    out = args.out or default_world_dir(args.seed, args.noise, args.train_samples, args.image_size)
    if is_world(out) and not args.force:
        print(f"shapes world already at {out} (use --force to regenerate)")
    else:
        start = time.perf_counter()
        generate_world_atomic(
            out, replace=args.force, seed=args.seed, train_samples=args.train_samples, docs=args.docs,
            noise=args.noise, image_size=args.image_size, shard_size=args.shard_size,
            workers=args.workers or default_workers(),
            eval_sizes=_eval_sizes(args.eval_size),
        )
        print(f"generated the shapes world into {out} in {time.perf_counter() - start:.1f} s")
    sizes = json.loads((Path(out) / "sizes.json").read_text())
    print("samples: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from vlp_core.data.convert import convert_table

    stats = convert_table(
        args.input, args.out, image_col=args.image_col, caption_col=args.caption_col,
        shard_size=args.shard_size, base_dir=args.base_dir,
    )
    print(stats.summary())
    print(f"shards: {args.out}/{{00000..{max(len(stats.shards) - 1, 0):05d}}}.tar")
    return 0


def _info(args: argparse.Namespace) -> int:
    from vlp_core.data.tario import CorruptShard, expand_urls, iter_samples

    target = Path(args.target)
    if target.is_dir():
        urls = sorted(str(p) for p in target.rglob("*.tar"))
    else:
        urls = expand_urls(args.target)
    if not urls:
        raise ValueError(f"no shards found at {args.target}")
    total, exts, broken = 0, Counter[str](), []
    for url in urls:
        n = 0
        try:
            for sample in iter_samples(url):
                n += 1
                exts.update(k for k in sample if not k.startswith("__"))
        except CorruptShard as e:
            broken.append(str(e))
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        total += n
        print(f"{url}: {n} samples")
    print(
        f"{len(urls)} shard(s), {total} samples; members: "
        + ", ".join(f"{k} {v}" for k, v in sorted(exts.items()))
    )
    for b in broken:
        print(f"broken shard: {b}")
    return 1 if broken else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``vlp-data``; returns the exit code (2 for user errors, printed as one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return {"synth": _synth, "convert": _convert, "info": _info}[args.command](args)
    except ValueError as e:
        print(f"vlp-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
