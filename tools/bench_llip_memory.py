"""Peak memory of Llip's loss (forward + backward): blockwise and checkpointed vs the naive B x B x D version.

Usage::

    python tools/bench_llip_memory.py                      # global batch 1024, chunk 128, D 128, H 8, K 16
    python tools/bench_llip_memory.py --dim 512 --tokens 32 --json out.json

What is measured. Each variant runs in a fresh subprocess (``--worker``), one process = one rank holding the
whole global batch. The worker builds the loss inputs (keys, folded values, queries and targets of all B
pairs, as leaf tensors that need gradients), runs one small warm-up call so that kernels and thread pools
exist, then records its resident set size, runs the loss forward and backward once, and reads the process's
peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``, which the kernel tracks exactly). The reported
figure is ``peak - RSS before the call``: the memory the loss itself needed on top of its inputs. The workers
run with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every tensor above 64 KiB by ``mmap`` and
returns it to the kernel on free, so the RSS follows the live tensors. (Its default dynamic threshold rises to
32 MiB after the first large free, after which freed blocks stay in the heap and fragmentation inflates the
RSS: the blockwise loss then showed 2-3x its real peak.) On CUDA the same worker reports
``torch.cuda.max_memory_allocated`` increments instead (``--device cuda``).

Variants:
- ``naive``: every (image, caption) pair conditioned at once: weights [B, B, H, K] and embeddings
  [B, B, D] materialised, autograd keeps them for backward.
- ``blockwise``: :func:`vlp_llip.llip_loss` with ``chunk x chunk`` blocks recomputed in backward.
- ``blockwise_nockpt``: the same blocks without checkpointing (autograd keeps every block's activations):
  shows that the saving comes from the recomputation, not from the blocking alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODES = ("naive", "blockwise", "blockwise_nockpt")


def naive_loss(keys_BHKd, values_BHKD, query_BHd, target_BD, logit_scale, logit_bias, tau):
    """The whole B x B x D tensor of conditioned embeddings at once (what the blockwise loss avoids)."""
    from vlp_llip.xattn import mixture_weights

    B = keys_BHKd.shape[0]
    a_BBHK = mixture_weights(keys_BHKd, query_BHd, tau)
    z_BBD = torch.einsum("vthk,vhke->vte", a_BBHK, values_BHKD)
    cos_BB = (F.normalize(z_BBD, dim=-1) * F.normalize(target_BD, dim=-1)[None]).sum(-1)
    logits_BB = logit_scale.exp() * cos_BB + logit_bias
    labels_BB = 2 * torch.eye(B, dtype=logits_BB.dtype, device=logits_BB.device) - 1
    return -F.logsigmoid(labels_BB * logits_BB).sum() / B


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(args: argparse.Namespace) -> dict:
    from vlp_llip import llip_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    B, H, K, D = args.batch, args.heads, args.tokens, args.dim
    d = D // H

    def inputs(n: int):
        t = [torch.randn(n, H, K, d), torch.randn(n, H, K, D) / math.sqrt(H * K), torch.randn(n, H, d),
             torch.randn(n, D)]
        return [x.to(device).requires_grad_(True) for x in t]

    scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)

    def loss_fn(*xs):
        if args.mode == "naive":
            return naive_loss(*xs, scale, bias, args.tau)
        return llip_loss(*xs, scale, bias, tau=args.tau, chunk=args.chunk,
                         use_checkpoint=args.mode == "blockwise")

    loss_fn(*inputs(8)).backward()  # warm-up: kernels, thread pools, allocator arenas
    xs = inputs(B)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    loss = loss_fn(*xs)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"mode": args.mode, "peak_bytes": peak, "seconds": time.perf_counter() - t0, "loss": float(loss),
            "input_bytes": sum(x.numel() * x.element_size() for x in xs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1024, help="global batch B (one process)")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--dim", type=int, default=128, help="embedding dim D")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16, help="mixture tokens K")
    p.add_argument("--tau", type=float, default=5.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: default)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    B, H, K, D = args.batch, args.heads, args.tokens, args.dim
    print(f"B={B} chunk={args.chunk} D={D} H={H} K={K} device={args.device}; "
          f"one B x B x D float32 tensor = {B * B * D * 4 / 2**20:.0f} MiB, "
          f"one chunk x chunk x D block = {args.chunk**2 * D * 4 / 2**20:.1f} MiB")
    rows = []
    common = [f"--{k}={getattr(args, k)}" for k in ("batch", "chunk", "dim", "heads", "tokens", "tau", "device",
                                                     "threads")]
    for mode in args.modes.split(","):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, "--worker", f"--mode={mode}", *common],
                             capture_output=True, text=True, check=False, env=env)
        if out.returncode:
            print(f"{mode}: failed ({out.returncode}): {out.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{mode:18s} peak +{r['peak_bytes'] / 2**20:9.1f} MiB   {r['seconds']:7.2f} s   loss {r['loss']:.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
