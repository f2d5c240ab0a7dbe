#!/usr/bin/env python
"""Benchmark one training step: samples/s and peak memory, vlp against OpenCLIP with an identical model.

    python tools/bench_step.py --preset demo --batch 256
    python tools/bench_step.py --preset vit_b32 --batch 32 --steps 5

Each implementation runs in its own subprocess (clean peak-memory figures): forward of both towers, the
InfoNCE loss, backward and an AdamW step, on random inputs of the preset's shape. OpenCLIP runs only when
``open_clip_torch`` is installed; the model is built from the same widths, depths, heads, patch, context
and vocabulary. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak RSS
growth on the CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _build_vlp(cfg, vocab: int):
    from vlp_core.clip import METHOD
    from vlp_core.train.loop import TrainStep

    class _Tok:
        vocab_size, pad_id = vocab, 0

    model = METHOD.build_model(cfg, _Tok())
    loss = METHOD.build_loss(cfg)
    step = TrainStep(model, loss)
    return step, lambda images, tokens: step({"images": images, "tokens": tokens}).loss


def _build_openclip(cfg, vocab: int):
    import open_clip
    import torch

    v, t = cfg.model.vision, cfg.model.text
    model = open_clip.CLIP(
        embed_dim=cfg.model.embed_dim,
        vision_cfg=open_clip.CLIPVisionCfg(layers=v.depth, width=v.width, head_width=v.width // v.heads,
                                           patch_size=v.patch_size, image_size=v.image_size,
                                           mlp_ratio=v.mlp_ratio),
        text_cfg=open_clip.CLIPTextCfg(context_length=t.context_length, vocab_size=vocab, width=t.width,
                                       heads=t.heads, layers=t.depth, mlp_ratio=t.mlp_ratio),
    )
    loss_fn = open_clip.ClipLoss()

    def step(images, tokens):
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        return loss_fn(image_features, text_features, logit_scale)

    class _Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

    return _Wrap(), step


def _worker(args) -> dict:
    import torch

    from vlp_core.clip import METHOD
    from vlp_core.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = METHOD.preset(args.preset)
    from vlp_core.config import apply_overrides

    apply_overrides(cfg, args.set)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = args.vocab
    module, step = (_build_vlp if args.impl == "vlp" else _build_openclip)(cfg, vocab)
    module.to(device).train()
    opt = build_optimizer(module, cfg.optim, device=device)
    v, t = cfg.model.vision, cfg.model.text
    images = torch.randn(args.batch, 3, v.image_size, v.image_size, device=device)
    lengths = torch.randint(3, t.context_length, (args.batch,))
    tokens = torch.randint(4, vocab, (args.batch, t.context_length))
    tokens[torch.arange(t.context_length)[None] >= lengths[:, None]] = 0
    tokens[torch.arange(args.batch), lengths - 1] = 3
    tokens = tokens.to(device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))

    def one():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = step(images, tokens)
        loss.backward()
        opt.step()
        return loss

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = one()
    float(loss)  # one sync at the end
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    params = sum(p.numel() for p in module.parameters())
    return {"impl": args.impl, "device": str(device), "samples_per_s": args.steps * args.batch / elapsed,
            "peak_mem_mb": peak / 2**20, "params_m": params / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="a clip preset (model shape); default %(default)s")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=49408)
    p.add_argument("--device", default="auto")
    p.add_argument("--impl", choices=["vlp", "openclip", "both"], default="both")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    args = p.parse_args()
    if args.impl != "both":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(_worker(args)))
        return
    results = {}
    impls = ["vlp"]
    try:
        import open_clip  # noqa: F401

        impls.append("openclip")
    except ImportError:
        print("open_clip_torch is not installed: measuring vlp only", file=sys.stderr)
    for impl in impls:
        cmd = [sys.executable, __file__, "--impl", impl] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("impl", "set")]
        cmd += [f"--set={kv}" for kv in args.set]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"{impl} failed")
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results.values():
        print(f"{r['impl']:9s} {r['device']:5s} {r['params_m']:7.2f}M params  "
              f"{r['samples_per_s']:9.1f} samples/s  peak {r['peak_mem_mb']:8.1f} MiB")
    if "openclip" in results:
        from vlp_core.clip import METHOD
        from vlp_core.config import apply_overrides

        cfg = apply_overrides(METHOD.preset(args.preset), list(args.set))
        if cfg.model.vision.stem != "patch" or cfg.model.vision.pool != "token":
            print("note: OpenCLIP has no conv stem / avg pooling: add --set model.vision.stem=patch "
                  "--set model.vision.pool=token for an identical model")
        ratio = results["vlp"]["samples_per_s"] / results["openclip"]["samples_per_s"]
        print(f"speed ratio vlp/openclip: {ratio:.2f}x  (preset {args.preset}, batch {args.batch})")


if __name__ == "__main__":
    main()
