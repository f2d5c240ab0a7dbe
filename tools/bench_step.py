#!/usr/bin/env python
"""Benchmark one training step: samples/s, peak memory and MFU, vlp against OpenCLIP with an identical model.

    python tools/bench_step.py --preset demo --batch 256
    python tools/bench_step.py --preset vit_b16 --batch 256 --precision bf16            # OpenCLIP's ViT-B-16
    python tools/bench_step.py --preset vit_b32 --batch 256 --compile --parallel ddp
    torchrun --nproc_per_node 8 tools/bench_step.py --impl vlp --preset vit_b16 --batch 2048 --parallel fsdp

Each implementation runs in its own subprocess (clean peak-memory figures): forward of both towers, the
InfoNCE loss, backward and an AdamW step (the core's, fused on CUDA, for both), on random inputs of the
preset's shape. ``vit_b16`` is ``vit_b32`` with patch 16 (OpenCLIP's ``ViT-B-16``). OpenCLIP runs only when
``open_clip_torch`` is installed; its model is built from the same widths, depths, heads, patch, context and
vocabulary.

``--compile``: each implementation compiles the way its trainer does. vlp: the whole step (model + loss),
after DDP wrapping under ``--parallel ddp`` (``torch.compile(DDP(m))``, the order that lets DDP's all-reduce
overlap the backward) or per block under ``--parallel fsdp`` (the core's ``apply_parallel``). OpenCLIP: its
``main.py``'s ``torch.compile(model)`` of the (DDP-wrapped) model, the loss outside. The compile happens in
the warm-up steps, which are not timed.

``--parallel``: ``none`` (default), ``ddp`` (DistributedDataParallel even at world size 1, so its hooks are
measured) or ``fsdp`` (the core's ``train.parallel=fsdp``; OpenCLIP has no FSDP and runs under DDP). Without
torchrun a one-rank process group is made (NCCL on CUDA, gloo on the CPU); under torchrun ``--batch`` is the
global batch, split over the ranks, and rank 0 reports.

MFU: the step's FLOPs are counted once (``torch.utils.flop_counter``, forward + backward at batch 2, scaled
to the batch) and divided by the elapsed time and the GPU's dense bf16 peak (H100/H200 989 TFLOP/s, A100 312;
``--peak-tflops`` to override). Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's
peak RSS growth on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense bf16


def _preset(name: str, overrides: list[str]):
    from vlp_core.clip import METHOD
    from vlp_core.config import apply_overrides

    cfg = METHOD.preset("vit_b32" if name == "vit_b16" else name)
    if name == "vit_b16":
        cfg.model.vision.patch_size = 16
    return apply_overrides(cfg, list(overrides))


def _build_vlp(cfg, vocab: int):
    """(module to optimise, call(module, images, tokens) -> loss)."""
    from vlp_core.clip import METHOD
    from vlp_core.train.loop import TrainStep

    class _Tok:
        vocab_size, pad_id = vocab, 0

    step = TrainStep(METHOD.build_model(cfg, _Tok()), METHOD.build_loss(cfg))
    return step, lambda m, images, tokens: m({"images": images, "tokens": tokens}).loss


def _build_openclip(cfg, vocab: int):
    import open_clip

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

    def call(m, images, tokens):
        image_features, text_features, logit_scale = m(images, tokens)[:3]
        return loss_fn(image_features, text_features, logit_scale)

    return model, call


def _process_group(args):
    """None without ``--parallel``; else the core's DistInfo, a one-rank group when not under torchrun."""
    if args.parallel == "none":
        return None
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        from vlp_core.testing.dist import free_port

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if int(os.environ["WORLD_SIZE"]) == 1 and not dist.is_initialized():  # the core makes no group for one rank
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=0, world_size=1)
    from vlp_core.distributed import init_distributed

    return init_distributed(device=args.device)


def _require_fsdp(cfg) -> None:
    """A one-line exit unless the core supports ``train.parallel`` (FSDP2)."""
    msg = ("bench_step: --parallel fsdp needs the core's train.parallel (FSDP2), which this vlp_core does not "
           "have")
    if not hasattr(cfg.train, "parallel"):
        raise SystemExit(f"{msg} (no config key train.parallel)")
    try:
        from vlp_core.train.parallel import apply_parallel  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{msg} ({e})") from None


def _wrap(impl: str, module, cfg, args, info, device, bf16: bool):
    """The module the step calls: compiled and/or wrapped for ``--parallel``, as the implementation's trainer does."""
    import torch

    if impl == "vlp" and args.parallel == "fsdp":
        from vlp_core.train.parallel import apply_parallel

        return apply_parallel(module, info, parallel="fsdp", compile=args.compile, bf16_params=bf16)
    if args.parallel != "none":  # DDP (OpenCLIP under fsdp too: it has no FSDP of its own)
        ids = [device.index] if device.type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return torch.compile(module) if args.compile else module


def _flops_per_sample(module, call, images, tokens, amp) -> float:
    """Forward + backward FLOPs of one sample, counted at batch 2 (the loss's B^2 share is negligible)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with amp:
            loss = call(module, images[:2], tokens[:2])
        loss.backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def _peak_tflops(args, device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda" or args.precision == "fp32":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _worker(args) -> dict:
    import torch

    from vlp_core.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = _preset(args.preset, args.set)
    if args.parallel == "fsdp":
        _require_fsdp(cfg)
    info = _process_group(args)
    if info is not None:
        device = info.device
    else:
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                                          else "cpu"))
    world, rank = (info.world_size, info.rank) if info is not None else (1, 0)
    if args.batch % world:
        raise SystemExit(f"bench_step: --batch {args.batch} is not divisible by the world size {world}")
    batch = args.batch // world
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    bf16 = precision == "bf16"
    module, call = (_build_vlp if args.impl == "vlp" else _build_openclip)(cfg, args.vocab)
    module.to(device).train()
    v, t = cfg.model.vision, cfg.model.text
    images = torch.randn(batch, 3, v.image_size, v.image_size, device=device)
    lengths = torch.randint(3, t.context_length, (batch,))
    tokens = torch.randint(4, args.vocab, (batch, t.context_length))
    tokens[torch.arange(t.context_length)[None] >= lengths[:, None]] = 0
    tokens[torch.arange(batch), lengths - 1] = 3
    tokens = tokens.to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    flops = _flops_per_sample(module, call, images, tokens, amp)
    wrapped = _wrap(args.impl, module, cfg, args, info, device, bf16)
    opt = build_optimizer(module, cfg.optim, device=device)  # after FSDP: its parameters are the shards
    sync = None
    if args.impl == "vlp" and args.parallel == "fsdp":
        from vlp_core.train import parallel

        if hasattr(parallel, "split_plain_groups"):
            parallel.split_plain_groups(opt)
        sync = getattr(parallel, "sync_replicated_grads", None)

    def one():
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = call(wrapped, images, tokens)
        loss.backward()
        if sync is not None:
            sync(module)
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
    samples_per_s = args.steps * batch * world / elapsed
    peak_tflops = _peak_tflops(args, device)
    achieved = flops * samples_per_s / 1e12
    out = {"impl": args.impl, "device": str(device), "samples_per_s": samples_per_s, "peak_mem_mb": peak / 2**20,
           "params_m": params / 1e6,  # a DTensor's numel is the full tensor's
           "tflops": achieved, "mfu": achieved / (peak_tflops * world) if peak_tflops else None,
           "gflops_per_sample": flops / 1e9, "compile": args.compile, "precision": precision, "world": world,
           "parallel": "ddp" if args.impl == "openclip" and args.parallel == "fsdp" else args.parallel,
           "rank": rank}
    if info is not None:
        from vlp_core.distributed import cleanup

        cleanup()
    return out


def _line(r: dict) -> str:
    mfu = f"  MFU {100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else ""
    tags = [r["precision"]] + (["compile"] if r["compile"] else []) + ([r["parallel"]] if r["parallel"] != "none"
                                                                      else [])
    return (f"{r['impl']:9s} {r['device']:7s} {r['params_m']:7.2f}M params  {r['samples_per_s']:9.1f} samples/s  "
            f"{r['tflops']:7.1f} TFLOP/s{mfu}  peak {r['peak_mem_mb']:8.1f} MiB  [{', '.join(tags)}]")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="a clip preset (model shape), or vit_b16; default %(default)s")
    p.add_argument("--batch", type=int, default=256, help="global batch (split over torchrun's ranks)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile happens here)")
    p.add_argument("--vocab", type=int, default=49408)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile, each implementation its own way")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's peak for MFU (default: by name)")
    p.add_argument("--impl", choices=["vlp", "openclip", "both"], default="both")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print each result as one JSON line too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.impl != "both":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = _worker(args)
        if result["rank"] == 0:
            print(json.dumps(result))
        return
    if args.parallel == "fsdp":
        _require_fsdp(_preset(args.preset, args.set))
    results = {}
    impls = ["vlp"]
    try:
        import open_clip  # noqa: F401

        impls.append("openclip")
    except ImportError:
        print("open_clip_torch is not installed: measuring vlp only", file=sys.stderr)
    for impl in impls:
        cmd = [sys.executable, __file__, "--impl", impl] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("impl", "set", "compile", "json")]
        cmd += [f"--set={kv}" for kv in args.set] + (["--compile"] if args.compile else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"{impl} failed")
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results.values():
        print(_line(r))
        if args.json:
            print(json.dumps(r))
    if "openclip" in results:
        cfg = _preset(args.preset, args.set)
        if cfg.model.vision.stem != "patch" or cfg.model.vision.pool != "token":
            print("note: OpenCLIP has no conv stem / avg pooling: add --set model.vision.stem=patch "
                  "--set model.vision.pool=token for an identical model")
        ratio = results["vlp"]["samples_per_s"] / results["openclip"]["samples_per_s"]
        print(f"speed ratio vlp/openclip: {ratio:.2f}x  (preset {args.preset}, batch {args.batch}"
              f"{', compile' if args.compile else ''}{', ' + args.parallel if args.parallel != 'none' else ''})")


if __name__ == "__main__":
    main()
