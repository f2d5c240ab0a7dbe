"""torchrun worker: both stages' loss and gradients on a W-way split of one global batch (gloo, CPU).

Every rank builds the same seeded model (``build_stage``), takes rows ``[rank*B, (rank+1)*B)`` of the same
global batch (``global_batch``), runs the step through DDP (or the core's FSDP2 for ``<stage>_fsdp`` jobs)
and rank 0 saves the mean loss over ranks and the averaged (for FSDP: gathered) gradients. ``<stage>_accum``
jobs run each rank's rows as ``CHUNKS`` chunks through the core's exact accumulation under DDP. The pytest side
computes the same step in one process on the whole batch.

Usage: dist_worker.py OUT_DIR llm=TEXT_MODEL clip=TEXT_MODEL [llm_fsdp=... clip_fsdp=... llm_accum=...]
(writes OUT_DIR/<job>.pt)
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

N = 8  # global batch
CHUNKS = 2  # exact accumulation chunks per rank (<stage>_accum jobs)
TEXTS_Q = ["a red circle.", "a large blue star at the top left.", "a green cross.", "a small white hexagon.",
           "a yellow square in the center.", "a purple triangle on the right.", "a cyan star.", "an orange circle."]


def build_stage(stage: str, text_model: str):
    """(step module with ``forward(batch) -> loss``, global batch) for ``stage`` 'llm' or 'clip'."""
    from vlp_llm2clip import LLM_METHOD, METHOD

    from vlp_core.data.tokenizer import Tokenizer
    from vlp_core.train.loop import TrainStep

    method = LLM_METHOD if stage == "llm" else METHOD
    cfg = method.preset("llm_smoke" if stage == "llm" else "smoke")
    cfg.loss.text_model = text_model
    cfg.model.text.tokenizer = text_model
    if stage == "llm":
        cfg.loss.lora_dropout = 0.0  # dropout draws differ per rank
    tok = Tokenizer.from_pretrained(text_model, context_length=cfg.model.text.context_length)
    torch.manual_seed(0)
    model, loss = method.build_model(cfg, tok), method.build_loss(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero; make it non-zero so every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    step = TrainStep(model, loss)
    if stage == "llm":
        from vlp_llm2clip.encoder import tokenize

        positives = [t.replace("a ", "one ", 1) for t in TEXTS_Q]
        negatives = TEXTS_Q[1:] + TEXTS_Q[:1]
        batch = {}
        for name, texts, instr in (("q", TEXTS_Q, "Given a sentence, retrieve a detailed relevant sentence;"),
                                   ("p", positives, ""), ("n", negatives, "")):
            enc = tokenize(tok, texts, [instr] * N if instr else None)
            batch.update({f"{name}_{k}": v for k, v in enc.items()})
    else:
        batch = {"images": torch.randn(N, 3, 32, 32, generator=g), "text_emb": torch.randn(N, 32, generator=g)}
    return step, batch


def shard(batch: dict, rank: int, world: int) -> dict:
    b = N // world
    return {k: v[rank * b: (rank + 1) * b] for k, v in batch.items()}


def grads(module) -> dict[str, torch.Tensor]:
    """Every gradient, whole (a DTensor shard is gathered: a collective, so every rank calls this)."""
    out = {}
    for n, p in module.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[n] = g.detach().clone()
    return out


def _accumulated_loss(step, ddp, local: dict) -> torch.Tensor:
    """The rank batch in ``CHUNKS`` chunks through exact accumulation under DDP (all-reduce on the last one)."""
    import contextlib

    from vlp_core.train.accumulate import accumulate_exact, split_batch

    out = accumulate_exact(step, ddp, split_batch(local, CHUNKS), local, backward=lambda loss: loss.backward(),
                           sync=lambda last: contextlib.nullcontext() if last else ddp.no_sync(),
                           autocast=contextlib.nullcontext(), device=torch.device("cpu"))
    return out.loss


def main() -> None:
    from vlp_core.distributed import cleanup, init_distributed, wrap_ddp

    out_dir, jobs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    info = init_distributed(device="cpu")
    for job, text_model in jobs:
        stage = job.removesuffix("_fsdp").removesuffix("_accum")
        step, batch = build_stage(stage, text_model)
        sharded = 0
        if job.endswith("_accum"):
            loss = _accumulated_loss(step, wrap_ddp(step, info), shard(batch, info.rank, info.world_size))
        elif job.endswith("_fsdp"):
            from torch.distributed.fsdp import FSDPModule

            from vlp_core.train.parallel import apply_parallel, sync_replicated_grads

            run = apply_parallel(step, info, parallel="fsdp")
            sharded = sum(isinstance(m, FSDPModule) for m in step.modules())
        else:
            run = wrap_ddp(step, info)
        if not job.endswith("_accum"):
            loss = run(shard(batch, info.rank, info.world_size)).loss
            loss.backward()
        if job.endswith("_fsdp"):
            sync_replicated_grads(step)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= info.world_size
        got = grads(step)
        if info.rank == 0:
            torch.save({"loss": mean, "grads": got, "world": info.world_size, "fsdp_modules": sharded},
                       f"{out_dir}/{job}.pt")
    cleanup()


if __name__ == "__main__":
    main()
