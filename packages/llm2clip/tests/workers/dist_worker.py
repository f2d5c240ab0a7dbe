"""torchrun worker: both stages' loss and gradients on a W-way split of one global batch (gloo, CPU), and
both stages' parameters after 3 trainer steps under DDP, FSDP2 and HSDP against one process.

Every rank builds the same seeded model (``build_stage``), takes rows ``[rank*B, (rank+1)*B)`` of the same
global batch (``global_batch``), runs the step through DDP and rank 0 saves the mean loss over ranks and the
averaged gradients. ``<stage>_accum`` jobs run each rank's rows as ``CHUNKS`` chunks through the core's exact
accumulation under DDP. The pytest side computes the same step in one process on the whole batch.

``<stage>_parallel`` jobs are vlp-core's parameter check (:mod:`vlp_core.testing.parallel_worker`) in this
launch: the stage's smoke preset with the tiny text model (``parallel_case``), the one-process references
computed before the process group exists, rank 0's report saved as ``<job>.json`` for
:func:`vlp_core.testing.parallel.check_report`.

Usage: dist_worker.py OUT_DIR llm=TEXT_MODEL clip=TEXT_MODEL [llm_accum=... clip_accum=...]
[world=WORLD llm_parallel=TEXT_MODEL mntp_parallel=TEXT_MODEL clip_parallel=TEXT_MODEL]
(writes OUT_DIR/<job>.pt or .json)
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

N = 8  # global batch
CHUNKS = 2  # exact accumulation chunks per rank (<stage>_accum jobs)
TEXTS_Q = ["a red circle.", "a large blue star at the top left.", "a green cross.", "a small white hexagon.",
           "a yellow square in the center.", "a purple triangle on the right.", "a cyan star.", "an orange circle."]


def nonzero_lora_b(model) -> None:
    """LoRA B starts at zero (peft), so A gets no gradient in the first step: make B ``0.1 * N(0, 1)`` (seeded)
    so that every LoRA weight gets one."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


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
    nonzero_lora_b(model)
    g = torch.Generator().manual_seed(1)
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


def parallel_case(stage: str, text_model: str, world: str):
    """vlp-core's parallel-check case for ``stage``: the smoke preset on the shapes world through the stage's
    own adapter, float32 only (both stages pool the text model's states ``.float()`` and stage 2's adapter
    reads its input ``.float()``, so a float64 run would not be one).

    Stage 1 (``llm_smoke``: SimCSE with the colour-swapped hard negatives, the preset's lr without warm-up)
    starts from :func:`nonzero_lora_b`: from peft's B = 0, A gets no gradient in the first step, so 3 steps
    barely move the attention's LoRA A (1e-4 of its size even at lr 1e-2), and B's error relative to its own
    size is the gradient's float32 noise over AdamW's eps (6.7e-6 in one process with each batch's rows
    permuted, at lr 3e-2; 1.2e-7 from the non-zero B). Dropout is off (its masks differ between a whole batch
    and its halves).

    Stage 2 (``smoke``): images through the adapter (caption embeddings computed into ``$VLP_CACHE`` on first
    use), whose caption embeddings are then replaced by seeded Gaussian rows. A random tiny BERT embeds the
    shapes captions almost alike (mean cosine 0.97), which makes the step ill-conditioned in float32: in one
    process, only permuting each batch's rows already moves a zero-initialised MLP bias by 2.5e-5 of its size
    (1.5e-6 with distinct embeddings), which would measure the data, not the parallelism."""
    from vlp_core.testing.parallel_worker import build_case

    common = [f"loss.text_model={text_model}", f"model.text.tokenizer={text_model}"]
    if stage in ("llm", "mntp"):  # mntp: the same with LLM2Vec's masked next-token prediction
        objective = ["loss.objective=mntp"] if stage == "mntp" else []
        return build_case("vlp_llm2clip:LLM_METHOD", world, preset="llm_smoke", dtypes=("f32",),
                          overrides=[*common, "loss.lora_dropout=0.0", "optim.warmup_steps=1", *objective],
                          prepare=nonzero_lora_b)
    case = build_case("vlp_llm2clip", world, preset="smoke", dtypes=("f32",),
                      overrides=[*common, f"data.world_dir={world}"])
    g = torch.Generator().manual_seed(1)
    for batch in case.batches:
        batch["text_emb"] = torch.randn(batch["text_emb"].shape, generator=g)
    return case


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
    from vlp_core.testing.parallel_worker import compare, references

    out_dir, pairs = sys.argv[1], [a.split("=", 1) for a in sys.argv[2:]]
    world = dict(pairs).get("world", "")
    jobs = [(job, value) for job, value in pairs if job != "world"]
    parallel = {job: parallel_case(job.removesuffix("_parallel"), value, world)
                for job, value in jobs if job.endswith("_parallel")}
    refs = {job: references(case) for job, case in parallel.items()}  # one process: before the process group
    info = init_distributed(device="cpu")
    for job, text_model in jobs:
        if job in parallel:
            report = compare(parallel[job], refs[job], info)
            if info.rank == 0:
                with open(f"{out_dir}/{job}.json", "w") as f:
                    json.dump(report, f)
            continue
        stage = job.removesuffix("_accum")
        step, batch = build_stage(stage, text_model)
        if job.endswith("_accum"):
            loss = _accumulated_loss(step, wrap_ddp(step, info), shard(batch, info.rank, info.world_size))
        else:
            ddp = wrap_ddp(step, info)  # held through the backward: its reducer all-reduces the gradients
            loss = ddp(shard(batch, info.rank, info.world_size)).loss
            loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= info.world_size
        got = grads(step)
        if info.rank == 0:
            torch.save({"loss": mean, "grads": got, "world": info.world_size}, f"{out_dir}/{job}.pt")
    cleanup()


if __name__ == "__main__":
    main()
