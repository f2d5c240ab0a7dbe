"""Command-line entry points shared by every method: ``<m>-train`` and ``<m>-eval``.

A method's console script is one line: ``def main(): return train_main(METHOD)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import NoReturn

from vlp_core.config import RunConfig, apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from vlp_core.method import MethodSpec

__all__ = ["train_main", "eval_main", "build_config", "train_parser", "EXIT_ERROR", "EXIT_PEER_LOST"]

log = logging.getLogger("vlp")

# Shortcut flags -> config keys (each also reachable with --set).
_SHORTCUTS = {
    "train_data": "data.train_data",
    "batch_size": "train.batch_size",
    "steps": "train.steps",
    "lr": "optim.lr",
    "output_dir": "train.output_dir",
    "resume": "train.resume",
    "init_from": "train.init_from",
    "workers": "data.workers",
    "precision": "train.precision",
    "eval_data": "eval.data",
    "seed": "train.seed",
}


def train_parser(method: MethodSpec) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{method.name}-train",
        description=f"{method.description or method.name}. With no arguments: the '{method.default_preset}' "
        "preset on the synthetic shapes world (generated into ~/.cache/vlp on first use), then evaluation.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        f"  {method.name}-train                                   # the demo\n"
        f"  {method.name}-train --train-data 'shards/{{00000..00999}}.tar' --batch-size 4096\n"
        f"  torchrun --nproc_per_node 8 $(which {method.name}-train) --preset <name>\n"
        f"  {method.name}-train --resume latest                   # continue the newest run exactly\n"
        f"  {method.name}-train --preset <name> --init-from ViT-B-32.safetensors   # start from released weights\n"
        f"  {method.name}-train --set optim.lr=1e-3 --set model.vision.depth=6 --print-config",
    )
    p.add_argument("--preset", default=method.default_preset,
                   help=f"named run config: {', '.join(method.presets)} (default: %(default)s)")
    p.add_argument("--config", help="a YAML run config (e.g. the config.yaml of an earlier run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--train-data", help="shard pattern, several sources joined by '::' (data.train_data)")
    p.add_argument("--batch-size", help="GLOBAL batch over all ranks and accumulation steps (train.batch_size)")
    p.add_argument("--steps", help="number of optimizer steps (train.steps)")
    p.add_argument("--lr", help="peak learning rate (optim.lr)")
    p.add_argument("--output-dir", help="run folder (train.output_dir); default runs/<method>-<preset>-<time>")
    p.add_argument("--resume", help="'latest' (newest checkpoint of the run folder) or a checkpoint path")
    p.add_argument("--init-from", help="start the towers from these weights: a vlp checkpoint, or an OpenAI/"
                   "OpenCLIP/Hugging Face/EVA checkpoint (see vlp-convert); fresh optimizer, step 0")
    p.add_argument("--workers", help="data loader workers per rank (data.workers)")
    p.add_argument("--precision", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    p.add_argument("--eval-data", help="folder holding eval/<set> folders (eval.data)")
    p.add_argument("--seed", help="training seed (train.seed)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def build_config(method: MethodSpec, args: argparse.Namespace) -> RunConfig:
    cfg = method.preset(args.preset)
    if args.config:
        data = load_yaml(args.config)
        from_dict(cfg, data)
        cfg.method = method.name
    shortcuts = [f"{key}={getattr(args, name)}" for name, key in _SHORTCUTS.items()
                 if getattr(args, name, None) is not None]
    apply_overrides(cfg, shortcuts + list(args.overrides))
    cfg.validate()
    return cfg


# Exit statuses of <m>-train (README, "Faults and recovery"); EXIT_PREEMPTED (75) is vlp_core.train.loop's.
EXIT_ERROR = 2  # a one-line error: config, data, checkpoint, a failed checkpoint write, non-finite loss
EXIT_PEER_LOST = 3  # a collective failed: another rank died or did not answer within train.dist_timeout_s


def _report(prog: str, error: BaseException) -> None:
    """``<prog>: error: <one line>`` on stderr; an error every rank raised alike (SharedError) on rank 0 only."""
    from vlp_core.distributed.utils import SharedError, get_rank

    if not isinstance(error, SharedError) or get_rank() == 0:
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)


def _exit_now(code: int) -> NoReturn:
    """Leave at once, without tearing the process group down: with a peer gone that can block (NCCL) or
    abort. Logs and streams are flushed first; DataLoader workers exit when they see their parent gone."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _cleanup(ok: bool) -> None:
    import contextlib

    from vlp_core.distributed import cleanup

    # After an error a peer may never reach the barrier; a peer that already died must not cause a traceback.
    with contextlib.suppress(Exception):
        cleanup(wait=ok)


def _setup_logging(verbose: bool) -> None:
    from vlp_core.distributed import setup_logging

    setup_logging("DEBUG" if verbose else "INFO")


def train_main(method: MethodSpec, argv: list[str] | None = None) -> int:
    args = train_parser(method).parse_args(argv)
    if args.list_presets:
        for name, fn in method.presets.items():
            doc = (fn.__doc__ or "").strip().splitlines()
            print(f"{name:20s} {doc[0] if doc else ''}")
        return 0
    prog = f"{method.name}-train"
    try:
        cfg = build_config(method, args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    _setup_logging(args.verbose)
    from vlp_core.distributed.utils import PeerLostError, SharedError, is_collective_failure, is_initialized, peer_lost
    from vlp_core.train.loop import EXIT_PREEMPTED, Preempted, run

    try:
        results = run(cfg, method)
    except Preempted:  # the checkpoint is written; the loop logged it
        _cleanup(True)
        return EXIT_PREEMPTED
    except SharedError as e:  # every rank stopped at the same point: a clean teardown
        _report(prog, e)
        _cleanup(True)
        return EXIT_ERROR
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        _report(prog, e)
        _cleanup(False)
        return EXIT_ERROR
    except RuntimeError as e:
        if not (isinstance(e, PeerLostError) or (is_initialized() and is_collective_failure(e))):
            raise
        _report(prog, peer_lost(e, "before the first step"))  # a PeerLostError passes through unchanged
        _exit_now(EXIT_PEER_LOST)
    _cleanup(True)
    from vlp_core.distributed import is_main

    if results and is_main():
        print(json.dumps(results, indent=1))
    return 0


def eval_main(method: MethodSpec, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=f"{method.name}-eval",
        description="Zero-shot classification, retrieval and the compositional probe for a trained checkpoint, "
        "sharded over ranks under torchrun.")
    p.add_argument("checkpoint", help="a run folder (its newest checkpoint), a trainer checkpoint, a vlp "
                   "checkpoint written by vlp-convert, or a released checkpoint vlp-convert reads")
    p.add_argument("--eval-data", help="folder holding eval/<set> folders (default: the run's shapes world)")
    p.add_argument("--imagefolder", help="an ImageFolder root to classify zero-shot as well (an ImageNet "
                   "validation folder of wnid class folders uses the 1000 ImageNet names and 80 OpenAI templates)")
    p.add_argument("--wds", help="CLIP_benchmark webdataset sets, comma-separated folders (eval.wds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override eval.* keys, e.g. --set eval.zeroshot=zeroshot_shape")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    try:
        _setup_logging(args.verbose)
        results = _evaluate_checkpoint(method, args)
    except (ValueError, FileNotFoundError) as e:
        _report(f"{method.name}-eval", e)
        _cleanup(False)
        return EXIT_ERROR
    _cleanup(True)
    from vlp_core.distributed import is_main

    if is_main():
        print(json.dumps(results, indent=1))
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


def _read_for_eval(method: MethodSpec, checkpoint: str) -> tuple[RunConfig, dict, int, Path]:
    """(config, TrainStep state dict, step, run folder) of a trainer checkpoint, run folder or vlp file.

    Trainer checkpoints (``step_<n>.pt`` files and ``step_<n>/`` DCP folders) are read as the trainer reads them
    (our own files in a run folder the user names); any other file goes through the safe loader and the
    converter registry (``vlp-convert``'s readers: a vlp ``.safetensors`` file, or a raw released checkpoint
    whose layout the keys tell).
    """
    from vlp_core.train.checkpoint import CheckpointManager, is_trainer_checkpoint, load_full_state

    path = Path(checkpoint).expanduser()
    if path.is_dir() and not is_trainer_checkpoint(path):
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        if CheckpointManager(folder).list():
            path = CheckpointManager(folder).latest() or path
    if not path.exists():
        raise ValueError(f"checkpoint not found: {checkpoint}")
    if is_trainer_checkpoint(path):
        saved = load_full_state(path)
        name = saved["config"].get("preset")
        cfg = method.preset(name if name in method.presets else method.default_preset)
        from_dict(cfg, saved["config"])
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return cfg, saved["model"], int(saved["step"]), run_dir
    from vlp_core.convert import read_checkpoint

    converted = read_checkpoint(str(path))
    from vlp_core.convert.build import is_image_only

    if is_image_only(converted.state_dict):
        raise ValueError(f"{checkpoint} holds an image tower only (layout {converted.layout}): start a run from it "
                         "with --init-from; it cannot be evaluated zero-shot on its own")
    if converted.config.method != method.name:
        raise ValueError(f"{checkpoint} holds a '{converted.config.method}' model (layout {converted.layout}); "
                         f"evaluate it with {converted.config.method}-eval, not {method.name}-eval")
    cfg = method.preset(method.default_preset)
    from_dict(cfg, to_dict(converted.config))
    # A model trained on the shapes world (a vlp run exported to a file: no tokenizer named, the world's is
    # used) evaluates like its run; anything else (released weights) has no world: step -1 marks it, and it
    # needs evaluation sets named.
    step = converted.step if not cfg.model.text.tokenizer else -1
    return cfg, converted.state_dict, step, path.parent if path.is_file() else path


def _evaluate_checkpoint(method: MethodSpec, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from vlp_core.distributed import init_distributed
    from vlp_core.logging.writer import RunWriter
    from vlp_core.train.loop import TrainStep
    from vlp_core.train.setup import build_parts, evaluate, resolve_world

    cfg, state_dict, step, run_dir = _read_for_eval(method, args.checkpoint)
    if args.eval_data:
        cfg.eval.data = args.eval_data
    if args.imagefolder:
        cfg.eval.imagefolder = args.imagefolder
    if args.wds:
        cfg.eval.wds = args.wds
    apply_overrides(cfg, args.overrides)
    if step < 0 and not (cfg.eval.data or cfg.eval.imagefolder or cfg.eval.wds):
        raise ValueError(f"{args.checkpoint} brings no evaluation sets of its own: pass --imagefolder (e.g. an "
                         "ImageNet validation folder), --wds (CLIP_benchmark sets) or --eval-data")
    external, step = step < 0, max(step, 0)
    info = init_distributed()
    # A released/converted model was not trained on the shapes world: never generate or use it here.
    world = None if external else resolve_world(cfg, info)
    if external:
        cfg.data.train_data = cfg.data.train_data or "(none: evaluation only)"
    parts = build_parts(cfg, method, world=world, device=info.device)
    step_module = TrainStep(parts.model, parts.loss)
    step_module.load_state_dict(state_dict)
    step_module.to(info.device)
    cfg.train.output_dir = str(run_dir)
    writer = RunWriter(cfg.train.output_dir, enabled=False)
    with torch.no_grad():
        return evaluate(cfg, method, parts, step_module, writer, step, info.device)
