"""``vlp-convert SRC OUT [--to vlp|hf|open_clip] [--arch NAME] [--list]``.

Reads SRC with the safe loader (or, for the trainer's own ``step_<n>.pt``, its trusted loader), detects the
layout among the registered readers (built-in and every installed method's), converts to vlp's layout,
checks that the weights load strictly into the model the config builds, then writes OUT with the chosen
writer. Progress goes to stdout; an error is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("vlp")

_EXAMPLES = """\
examples:
  vlp-convert ViT-B-32.pt clip_b32.safetensors                        # OpenAI's TorchScript release
  vlp-convert open_clip_model.safetensors b32.safetensors --arch ViT-B-32   # an OpenCLIP (LAION) state dict
  vlp-convert openai_b16_state_dict.bin b16.safetensors --arch ViT-B-16-quickgelu
  vlp-convert ./clip-vit-base-patch32 hf_b32.safetensors              # a Hugging Face model folder
  vlp-convert runs/clip-demo/checkpoints/step_00001000.pt demo.safetensors   # your own trainer checkpoint
  vlp-convert demo.safetensors demo_open_clip.safetensors --to open_clip
  vlp-convert --list                                                  # every layout, writer and --arch name

then: clip-eval clip_b32.safetensors, or clip-train --init-from clip_b32.safetensors
"""


def _layouts_help() -> str:
    from vlp_core.convert.archs import CLIP_ARCHS, GENERIC_ARCHS
    from vlp_core.convert.registry import READERS, WRITERS

    lines = ["source layouts (detected from the keys and files; highest priority first):"]
    for r in sorted(READERS.values(), key=lambda r: -r.priority):
        lines.append(f"  {r.name:12s} {r.description}")
    lines.append("output formats (--to):")
    for w in WRITERS.values():
        lines.append(f"  {w.name:12s} {w.description}")
    lines.append("--arch (OpenAI/OpenCLIP state dicts; the activation is not in the keys):")
    lines.append("  " + ", ".join(CLIP_ARCHS))
    lines.append(f"  generic: {', '.join(GENERIC_ARCHS)} (sizes from the keys, heads = width / 64)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from vlp_core.convert.registry import WRITERS

    p = argparse.ArgumentParser(
        prog="vlp-convert",
        description="Convert a CLIP-family checkpoint into vlp's checkpoint file (and back out). Pickles are "
        "read weights-only; OpenAI's TorchScript archives with torch.jit.load; the trainer's own step_<n>.pt "
        "with its trusted loader (your own runs only).\n\n" + _layouts_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EXAMPLES,
    )
    p.add_argument("src", nargs="?", help="checkpoint file or folder to read")
    p.add_argument("out", nargs="?", help="file to write (.safetensors for vlp; .safetensors or .pt for open_clip)")
    p.add_argument("--to", default="vlp", help=f"output format: {', '.join(WRITERS)} (default: %(default)s)")
    p.add_argument("--arch", help="architecture name where the keys cannot tell (see --list)")
    p.add_argument("--list", action="store_true", help="list the layouts, output formats and --arch names")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; show tracebacks")
    return p


def _convert(args: argparse.Namespace) -> None:
    from vlp_core.convert import read_checkpoint
    from vlp_core.convert.registry import WRITERS, ConversionError

    if args.to not in WRITERS:
        raise ConversionError(f"unknown output format --to {args.to!r} (known: {', '.join(WRITERS)})")
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise ConversionError(f"output {args.out} is the source file itself")
    converted = read_checkpoint(args.src, args.arch)
    if args.to != "vlp":
        from vlp_core.convert.build import as_clip

        converted = as_clip(converted)  # methods built on the dual encoder export as CLIP
    WRITERS[args.to].write(converted, Path(args.out))


def _one_line(e: BaseException) -> str:
    from vlp_core.convert.registry import ConversionError

    text = " ".join(str(e).split())
    if isinstance(e, (ConversionError, ValueError, FileNotFoundError)):
        return text
    return f"{type(e).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run ``vlp-convert``; returns the exit code (0 done, 2 error)."""
    from vlp_core.convert import load_converters

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_converters()
            parser = _parser()
            args = parser.parse_args(argv)
            log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
            if args.list:
                print(_layouts_help())
                return 0
            if not args.src or not args.out:
                parser.error("SRC and OUT are required (or --list)")
            try:
                _convert(args)
            except Exception as e:  # noqa: BLE001 - one line for the user; -v shows the traceback
                if args.verbose:
                    raise
                print(f"vlp-convert: error: {_one_line(e)}", file=sys.stderr)
                return 2
            finally:
                for w in caught:
                    log.debug("warning: %s", w.message)
        return 0
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
