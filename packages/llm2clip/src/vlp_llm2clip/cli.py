"""``llm2clip-finetune-llm`` (stage 1), ``llm2clip-embed``, ``llm2clip-train`` (stage 2) and ``llm2clip-eval``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlp_core.cli import eval_main as _eval_main
from vlp_core.cli import train_main as _train_main

__all__ = ["train_main", "eval_main", "finetune_main", "embed_main", "export_text_model"]


def train_main(argv: list[str] | None = None) -> int:
    from vlp_llm2clip import METHOD

    return _train_main(METHOD, argv)


def eval_main(argv: list[str] | None = None) -> int:
    from vlp_llm2clip import METHOD

    return _eval_main(METHOD, argv)


def export_text_model(run_dir: str | Path) -> Path:
    """Merge the LoRA of a stage-1 run's newest checkpoint and save ``<run>/text_model`` (+ llm2clip.json)."""
    from vlp_core.config import from_dict
    from vlp_core.train.checkpoint import CheckpointManager
    from vlp_llm2clip import LLM_METHOD
    from vlp_llm2clip.caption_model import CaptionEmbedder
    from vlp_llm2clip.encoder import save_encoder
    from vlp_llm2clip.model import resolve_text_model

    run = Path(run_dir)
    path = CheckpointManager(run / "checkpoints").latest()
    if path is None:
        raise ValueError(f"no checkpoint in {run / 'checkpoints'}")
    saved = CheckpointManager.load(path)
    cfg = LLM_METHOD.preset(saved["config"].get("preset") if saved["config"].get("preset") in LLM_METHOD.presets
                            else LLM_METHOD.default_preset)
    from_dict(cfg, saved["config"])
    state = {k.removeprefix("model."): v for k, v in saved["model"].items() if k.startswith("model.")}
    source = resolve_text_model(cfg.model.text.tokenizer or cfg.loss.text_model)
    if cfg.loss.objective == "mntp":  # keep the inner (base) model: the SimCSE stage loads it with AutoModel
        from vlp_llm2clip.encoder import EncoderSettings, LlmEncoder
        from vlp_llm2clip.mntp import MntpModel

        lm_model = MntpModel(cfg.loss, from_config=True)
        lm_model.load_state_dict(state)
        lm = lm_model.lm.merge_and_unload() if hasattr(lm_model.lm, "merge_and_unload") else lm_model.lm
        settings = EncoderSettings(pool_bos=cfg.loss.pool_bos, bidirectional=cfg.loss.bidirectional)
        encoder = LlmEncoder(lm.model, bidirectional=cfg.loss.bidirectional, settings=settings)
        encoder.is_decoder = True
        return save_encoder(encoder, run / "text_model", tokenizer_source=source)
    model = CaptionEmbedder(cfg.loss, from_config=True)
    model.load_state_dict(state)
    return save_encoder(model.encoder, run / "text_model", tokenizer_source=source)


def finetune_main(argv: list[str] | None = None) -> int:
    """Stage 1 through the core trainer, then the merged model is saved to ``<run>/text_model``."""
    from vlp_core.cli import build_config, train_parser
    from vlp_llm2clip import LLM_METHOD

    parser = train_parser(LLM_METHOD)
    parser.prog = "llm2clip-finetune-llm"
    args = parser.parse_args(argv)
    if args.list_presets or args.print_config:
        return _train_main(LLM_METHOD, argv)
    try:
        cfg = build_config(LLM_METHOD, args)
    except ValueError as e:
        print(f"llm2clip-finetune-llm: error: {e}", file=sys.stderr)
        return 2
    overrides = [f"train.output_dir={cfg.train.output_dir}"] if cfg.train.output_dir else []
    if not cfg.train.output_dir:  # fix the folder now, so the export finds it
        import time

        cfg.train.output_dir = f"runs/{LLM_METHOD.name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        overrides = [f"train.output_dir={cfg.train.output_dir}"]
    argv = list(sys.argv[1:] if argv is None else argv)
    rc = _train_main(LLM_METHOD, [*argv, *sum((["--set", o] for o in overrides), [])])
    if rc == 0 and int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        try:
            out = export_text_model(cfg.train.output_dir)
        except ValueError as e:
            print(f"llm2clip-finetune-llm: error: {e}", file=sys.stderr)
            return 2
        print(f"text model saved to {out}")
    return rc


def embed_main(argv: list[str] | None = None) -> int:
    from vlp_llm2clip import METHOD

    p = argparse.ArgumentParser(
        prog="llm2clip-embed",
        description="Embed the captions of a shard set with the frozen text model; resumable and idempotent "
        "(done shards are skipped). Output: a folder of per-shard .npy arrays keyed by sample key, with a "
        "manifest recording the text model, context length and instruction that stage 2 checks.")
    p.add_argument("shards", help="shard pattern, e.g. 'data/{00000..00099}.tar' (several joined by '::')")
    p.add_argument("--text-model", required=True, help="a local transformers folder (stage-1 output), or 'minilm'")
    p.add_argument("--out", required=True, help="output folder (must not contain the input shards)")
    p.add_argument("--preset", default=METHOD.default_preset,
                   help=f"stage-2 preset whose defaults to use: {', '.join(METHOD.presets)} (default: %(default)s)")
    p.add_argument("--caption-keys", help="comma-separated caption keys (txt or json.<field>) (default: the "
                   "preset's loss.caption_keys)")
    p.add_argument("--context-length", type=int,
                   help="token rows length (default: the preset's model.text.context_length)")
    p.add_argument("--instruction", help="instruction put before every caption (default: the preset's "
                   "loss.caption_instruction, empty: LLM2CLIP embeds captions without one)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    args = p.parse_args(argv)
    try:
        import torch

        from vlp_core.distributed import cleanup, init_distributed
        from vlp_llm2clip.embed import embed_shards
        from vlp_llm2clip.model import resolve_text_model

        preset = METHOD.preset(args.preset)
        keys = args.caption_keys if args.caption_keys is not None else preset.loss.caption_keys
        context = args.context_length if args.context_length is not None else preset.model.text.context_length
        instruction = args.instruction if args.instruction is not None else preset.loss.caption_instruction
        text_model = resolve_text_model(args.text_model)
        info = init_distributed()
        device = info.device if args.device == "auto" else torch.device(args.device)
        counts = embed_shards(args.shards, args.out, text_model=text_model, caption_keys=keys.split(","),
                              context_length=context, batch_size=args.batch_size, dtype=args.dtype, device=device,
                              rank=info.rank, world_size=info.world_size, progress=True, instruction=instruction)
        cleanup()
    except (ValueError, FileNotFoundError) as e:
        print(f"llm2clip-embed: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0
