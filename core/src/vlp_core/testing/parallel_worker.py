"""torchrun worker: 3 optimizer steps of the real ``TrainStep`` under FSDP2, HSDP and DDP vs one process.

Every rank builds the method's smoke model and loss with a fixed seed (identical init), the trainer's AdamW
(``build_optimizer``: weight-decay groups) and schedule, and reads ``STEPS`` batches of ``B`` samples from the
shapes world's first train shard. The reference (one process, whole batches, no process group yet) and each
parallel run (rank ``r`` takes rows ``r*B/W:(r+1)*B/W``; gradients averaged by DDP's all-reduce or FSDP's
reduce-scatter) step with the trainer's own ``_optimizer_step`` (global grad-norm clipping, NaN guard).
Rank 0 writes, per mode and dtype (float32, float64), every tensor's ``max|p - p_ref| / max|p_ref|`` (FSDP
parameters gathered with ``full_tensor``); an attention ``qkv.bias`` is split into its key third and the
rest, because the key bias has an exact gradient of zero (softmax is shift-invariant), so in float32 AdamW
turns mere summation-order noise in it into updates (the test bounds it on its own). ``--method`` picks the
method package (default: the CLIP baseline).

Tensor-name legend: B global batch, W world size.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from vlp_core.data.tario import iter_samples
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.data.transforms import prepare_images
from vlp_core.distributed import all_gather_object, cleanup, init_distributed
from vlp_core.train.loop import TrainStep, _optimizer_step
from vlp_core.train.optim import build_optimizer, build_scheduler
from vlp_core.train.parallel import apply_parallel, split_scalar_groups

B, STEPS, SEED = 16, 3, 1234
DTYPES = {"f32": torch.float32, "f64": torch.float64}
MODES: dict[str, dict[str, Any]] = {"ddp": {}, "fsdp": {}, "hsdp": {"hsdp_replicate": 2}}  # hsdp: 2 x 1 mesh


def load_batches(world: Path, method: Any, cfg: Any, tokenizer: Tokenizer) -> list[dict[str, Any]]:
    adapter = method.build_adapter(cfg, tokenizer)
    shard = sorted((world / "train").glob("*.tar"))[0]
    samples = []
    for sample in iter_samples(str(shard)):
        samples.append(adapter(sample))
        if len(samples) == B * STEPS:
            break
    assert len(samples) == B * STEPS, f"{shard} holds fewer than {B * STEPS} samples"
    batches = []
    for i in range(STEPS):
        batch = adapter.collate(samples[i * B:(i + 1) * B])
        batches.append({k: prepare_images(v, "cpu") if k == "images" else v for k, v in batch.items()})
    return batches


def rows(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    per = B // world
    return {k: v[rank * per:(rank + 1) * per] if isinstance(v, (torch.Tensor, list)) else v
            for k, v in batch.items()}


def train(method: Any, cfg: Any, tokenizer: Tokenizer, batches: list[dict[str, Any]], info: Any, mode: str,
          dtype: torch.dtype, **kw: Any) -> dict[str, torch.Tensor]:
    """``len(batches)`` trainer steps in ``mode`` (``info`` None: one process, whole batches); the parameters."""
    torch.manual_seed(SEED)
    module = TrainStep(method.build_model(cfg, tokenizer), method.build_loss(cfg)).to(dtype)
    batches = [{k: v.to(dtype) if k == "images" else v for k, v in b.items()} for b in batches]
    net = apply_parallel(module, info, parallel=mode, **kw) if info is not None else module
    optimizer = build_optimizer(module, cfg.optim, device=torch.device("cpu"))
    split_scalar_groups(optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=STEPS)
    nonfinite = torch.zeros(())
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        out = net(rows(batch, info.rank, info.world_size) if info is not None else batch)
        out.loss.backward()
        _optimizer_step(module, optimizer, None, cfg.train.grad_clip, nonfinite, {"loss": out.loss.detach()})
        if hasattr(module.loss, "after_step"):  # method state (ALIP's running averages), as the trainer does
            module.loss.after_step(nonfinite == 0)
        scheduler.step()
    assert float(nonfinite) == 0
    params = {}
    for name, p in module.state_dict().items():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[name] = p.detach().clone()
    return params


def errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], *, relative: bool = True) -> dict[str, float]:
    """Per tensor ``max|got - ref| / max|ref|`` (``relative=False``: ``max|got - ref|``); a fused ``qkv.bias``
    also as ``<name>[key]``: its key third."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    errs = {}
    for k, r in ref.items():
        if not r.is_floating_point():
            continue
        scale = (float(r.abs().max()) or 1.0) if relative else 1.0
        diff = (got[k].double() - r.double()).abs()
        if k.endswith("attn.qkv.bias"):
            width = len(r) // 3
            errs[f"{k}[key]"] = float(diff[width:2 * width].max()) / scale
            diff = torch.cat([diff[:width], diff[2 * width:]])
        errs[k] = float(diff.max()) / scale
    return errs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="vlp_core.clip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    method = importlib.import_module(args.method).METHOD
    cfg = method.preset("smoke")
    # AdamW's eps 1e-3 (see vlp_core.testing.accumulate): with 1e-6 a gradient entry near zero turns float32
    # summation-order noise into a step of about lr, which measures the optimizer, not the parallelism.
    cfg.optim.eps = 1e-3
    world = Path(args.world)
    tokenizer = Tokenizer.from_pretrained(str(world / "tokenizer.json"), context_length=cfg.model.text.context_length)
    batches = load_batches(world, method, cfg, tokenizer)
    refs = {tag: train(method, cfg, tokenizer, batches, None, "single", dtype=dtype)  # no process group yet
            for tag, dtype in DTYPES.items()}

    info = init_distributed(device="cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    report: dict[str, Any] = {}
    for tag, dtype in DTYPES.items():
        ref = refs[tag]
        init = train(method, cfg, tokenizer, batches[:0], None, "single", dtype=dtype)
        report[f"moved_{tag}"] = errors(init, ref)  # the 3 steps moved every tensor (1 = by its whole size)
        # Tensors the float64 run barely moves (an exact or near-zero gradient: a key bias, to which softmax is
        # shift-invariant, or a bias whose shift a LayerNorm removes): in float32 they hold summation noise.
        if tag == "f64":
            report["static_f64"] = sorted(k for k, v in errors(init, ref, relative=False).items() if v <= 1e-5)
        got = {mode: train(method, cfg, tokenizer, batches, info, mode, dtype=dtype, **kw)
               for mode, kw in MODES.items()}
        for mode in MODES:
            report[f"{mode}_{tag}"] = errors(got[mode], ref)
        report[f"fsdp_vs_ddp_{tag}"] = errors(got["fsdp"], got["ddp"])
    gathered = all_gather_object(report)
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(gathered, indent=1))
    cleanup()


if __name__ == "__main__":
    main()
