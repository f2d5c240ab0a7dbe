"""torchrun worker: the real CLIP/SigLIP ``TrainStep`` under DDP vs one process on the whole batch.

For each check (InfoNCE; SigLIP with the preset's bias -10; SigLIP with bias -1, where the negatives
carry more of the gradient so a lost cross-rank gradient shows more) every rank:

1. builds the method's model and loss from ``METHOD.preset("smoke")`` with a fixed seed (identical init on
   every rank) and a real batch of ``B`` samples from the shapes world's first train shard (decoded and
   tokenized by the method's own adapter);
2. **before** any process group exists, computes the single-process reference: loss and every parameter
   gradient (model *and* loss module) on the full batch; the same gradients are also computed from an
   independent textbook formula of the loss on the model's features (``selfcheck``), so a bug shared by the
   single- and multi-process paths of the loss cannot hide;
3. then (process group up) wraps a fresh identical module with ``wrap_ddp``, feeds it rows
   ``r*B/W:(r+1)*B/W``, backpropagates; DDP averages the gradients;
4. compares the mean over ranks of the per-rank loss, and every averaged gradient, with the reference.

Everything runs in float64 (``.double()`` on both sides), so the only differences are summation order; a
float32 pass is reported as well (looser tolerance on the pytest side). Rank 0 writes a JSON report to
``--out``: per check the relative errors (``|a - ref| / |ref|``, norms) maximised over ranks, the reference
gradient norms, the per-rank losses and the list of parameter names. The pytest side applies tolerances.

Tensor-name legend: B global batch, W world size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.clip import METHOD
from vlp_core.data.tario import iter_samples
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.data.transforms import prepare_images
from vlp_core.distributed import all_gather_object, all_reduce_sum, cleanup, init_distributed, wrap_ddp
from vlp_core.train.loop import TrainStep

B = 16
SEED = 1234
# name -> (loss kind, loss config overrides)
CHECKS: dict[str, tuple[str, dict[str, float]]] = {
    "infonce": ("infonce", {}),
    "siglip": ("siglip", {}),
    "siglip_bias-1": ("siglip", {"siglip_init_bias": -1.0}),
}
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 (inf when the reference is exactly zero and ``a`` is not)."""
    a, ref = a.detach().double(), ref.detach().double()
    den = float(ref.norm())
    num = float((a - ref).norm())
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def load_batch(world: Path, cfg: Any, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """The first ``B`` samples of the first train shard through the method's adapter (uint8 images)."""
    adapter = METHOD.build_adapter(cfg, tokenizer)
    shard = sorted((world / "train").glob("*.tar"))[0]
    samples = []
    for sample in iter_samples(str(shard)):
        samples.append(adapter(sample))
        if len(samples) == B:
            break
    assert len(samples) == B, f"{shard} holds fewer than {B} samples"
    batch = adapter.collate(samples)
    return {"images": batch["images"], "tokens": batch["tokens"]}


def build(check: str, tokenizer: Tokenizer, dtype: torch.dtype) -> nn.Module:
    cfg = METHOD.preset("smoke")
    cfg.loss.kind, overrides = CHECKS[check]
    for key, value in overrides.items():
        setattr(cfg.loss, key, value)
    torch.manual_seed(SEED)  # the same init on every rank and for the reference
    return TrainStep(METHOD.build_model(cfg, tokenizer), METHOD.build_loss(cfg)).to(dtype)


def as_dtype(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"images": prepare_images(batch["images"], "cpu", dtype), "tokens": batch["tokens"]}


def textbook_loss(module: TrainStep, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full-batch loss written out from the model's features, independent of ``vlp_core.losses``."""
    feats = module.model(batch)
    zi_BD = feats["image_features"] / feats["image_features"].norm(dim=1, keepdim=True)
    zt_BD = feats["text_features"] / feats["text_features"].norm(dim=1, keepdim=True)
    loss_module = module.loss.loss
    scale = loss_module.logit_scale.clamp(max=loss_module.max_log_scale).exp()  # the cap: exp(scale) <= max
    if hasattr(loss_module, "logit_bias"):  # SigLIP: +-1 labels, summed over all pairs, divided by B
        labels_BB = 2 * torch.eye(len(zi_BD), dtype=zi_BD.dtype) - 1
        logits_BB = scale * zi_BD @ zt_BD.T + loss_module.logit_bias
        return -F.logsigmoid(labels_BB * logits_BB).sum() / len(zi_BD)
    logits_BB = scale * zi_BD @ zt_BD.T
    labels_B = torch.arange(len(zi_BD))
    return (F.cross_entropy(logits_BB, labels_B) + F.cross_entropy(logits_BB.T, labels_B)) / 2


def grads_of(module: nn.Module, who: str) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{who}: no gradient for {name}"
        grads[name] = p.grad.detach().clone()
    return grads


def reference(check: str, tokenizer: Tokenizer, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Single process, whole batch (no process group exists yet, so the losses see world size 1)."""
    module = build(check, tokenizer, dtype)
    out = module(as_dtype(batch, dtype))
    out.loss.backward()
    grads = grads_of(module, "reference")

    textbook = build(check, tokenizer, dtype)
    loss = textbook_loss(textbook, as_dtype(batch, dtype))
    loss.backward()
    tb_grads = grads_of(textbook, "textbook")
    selfcheck = max([rel_err(out.loss, loss), *(rel_err(grads[k], g) for k, g in tb_grads.items())])
    return {"loss": out.loss.detach().clone(), "grads": grads, "selfcheck": selfcheck}


def distributed(check: str, tokenizer: Tokenizer, batch: dict[str, torch.Tensor], dtype: torch.dtype,
                info: Any) -> dict:
    """This rank's share under DDP; returns the mean loss over ranks and the (DDP-averaged) gradients."""
    module = build(check, tokenizer, dtype)
    net = wrap_ddp(module, info)
    assert isinstance(net, nn.parallel.DistributedDataParallel), type(net)
    per = B // info.world_size
    rows = slice(info.rank * per, (info.rank + 1) * per)
    full = as_dtype(batch, dtype)
    out = net({k: v[rows] for k, v in full.items()})
    out.loss.backward()
    local_loss = out.loss.detach().clone()
    mean_loss = all_reduce_sum(local_loss.clone()) / info.world_size
    grads = grads_of(module, f"rank {info.rank}")
    return {"loss": mean_loss, "local_loss": float(local_loss), "grads": grads}


def compare(ref: dict, got: dict) -> dict:
    return {
        "loss_ref": float(ref["loss"]),
        "loss_dist": float(got["loss"]),
        "local_loss": got["local_loss"],
        "loss_err": rel_err(got["loss"], ref["loss"]),
        "selfcheck": ref["selfcheck"],
        "grad_err": {k: rel_err(got["grads"][k], g) for k, g in ref["grads"].items()},
        "ref_grad_norm": {k: float(g.double().norm()) for k, g in ref["grads"].items()},
        "dist_grad_norm": {k: float(g.double().norm()) for k, g in got["grads"].items()},
        "params": sorted(ref["grads"]),
        "dist_params": sorted(got["grads"]),
    }


def merge(per_rank: list[dict]) -> dict:
    """Worst case over ranks: max errors, min gradient norms; per-rank local losses kept as a list."""
    first = per_rank[0]
    return {
        "loss_ref": [r["loss_ref"] for r in per_rank],
        "loss_dist": [r["loss_dist"] for r in per_rank],
        "local_losses": [r["local_loss"] for r in per_rank],
        "loss_err": max(r["loss_err"] for r in per_rank),
        "selfcheck": max(r["selfcheck"] for r in per_rank),
        "grad_err": {k: max(r["grad_err"][k] for r in per_rank) for k in first["grad_err"]},
        "ref_grad_norm": {k: min(r["ref_grad_norm"][k] for r in per_rank) for k in first["ref_grad_norm"]},
        "dist_grad_norm": {k: min(r["dist_grad_norm"][k] for r in per_rank) for k in first["dist_grad_norm"]},
        "params": first["params"],
        "params_equal_over_ranks": all(r["params"] == first["params"] == r["dist_params"] for r in per_rank),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True, help="the shapes world folder (train shards, tokenizer)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = Path(args.world)

    cfg = METHOD.preset("smoke")
    tokenizer = Tokenizer.from_pretrained(str(world / "tokenizer.json"),
                                          context_length=cfg.model.text.context_length)
    batch = load_batch(world, cfg, tokenizer)

    # References first: without a process group every collective is the identity (world size 1).
    refs = {(check, tag): reference(check, tokenizer, batch, dtype)
            for check in CHECKS for tag, dtype in DTYPES.items()}

    info = init_distributed(device="cpu")
    assert info.world_size > 1 and info.backend == "gloo", info
    mine = {f"{check}_{tag}": compare(refs[check, tag], distributed(check, tokenizer, batch, dtype, info))
            for check in CHECKS for tag, dtype in DTYPES.items()}

    per_rank = all_gather_object(mine)
    if info.rank == 0:
        report = {"world_size": info.world_size, "batch": B,
                  "checks": {k: merge([r[k] for r in per_rank]) for k in mine}}
        Path(args.out).write_text(json.dumps(report, indent=1))
    cleanup()


if __name__ == "__main__":
    main()
