"""torchrun worker: 3 optimizer steps of the real ``TrainStep`` under FSDP2, HSDP and DDP vs one process.

Every rank builds the method's model and loss with a fixed seed (identical init), the trainer's AdamW
(``build_optimizer``: weight-decay groups) and schedule, and reads ``STEPS`` batches of ``B`` samples from the
shapes world's train shards through the method's own adapter. The reference (one process, whole batches, no
process group yet) and each parallel run (rank ``r`` takes rows ``r*B/W:(r+1)*B/W``; gradients averaged by
DDP's all-reduce or FSDP's reduce-scatter) step with the trainer's own ``_optimizer_step`` (global grad-norm
clipping, NaN guard). Rank 0 writes, per mode and dtype (float32, float64), every tensor's
``max|p - p_ref| / max|p_ref|`` (FSDP parameters gathered with ``full_tensor``); an attention ``qkv.bias`` is
split into its key third and the rest, because the key bias has an exact gradient of zero (softmax is
shift-invariant), so in float32 AdamW turns mere summation-order noise in it into updates (the test bounds it
on its own).

A method is described by a :class:`Case` (:func:`build_case`: the method spec, a preset, ``key=value``
overrides, the dtypes): a method whose model keeps a part frozen (LLM2CLIP's stage 1: a text model with LoRA)
or whose preset names its own tokenizer needs no code of its own here. Other torchrun workers (one launch for
several checks) call :func:`references` before they create the process group and :func:`compare` after it.

Usage: ``parallel_worker.py --world DIR --out FILE [--method MODULE[:ATTR]] [--preset NAME] [--set k=v ...]
[--dtype f32 --dtype f64]`` (default: the CLIP baseline's ``smoke`` preset in both dtypes).

Tensor-name legend: B global batch, W world size.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlp_core.config import apply_overrides
from vlp_core.data.tario import iter_samples
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.data.transforms import prepare_images
from vlp_core.distributed import all_gather_object, cleanup, init_distributed
from vlp_core.train.loop import TrainStep, _optimizer_step
from vlp_core.train.optim import build_optimizer, build_scheduler
from vlp_core.train.parallel import apply_parallel, split_scalar_groups

__all__ = ["B", "STEPS", "SEED", "DTYPES", "MODES", "Case", "resolve_method", "build_case", "load_batches",
           "references", "compare", "errors"]

B, STEPS, SEED = 16, 3, 1234
DTYPES = {"f32": torch.float32, "f64": torch.float64}
MODES: dict[str, dict[str, Any]] = {"ddp": {}, "fsdp": {}, "hsdp": {"hsdp_replicate": 2}}  # hsdp: 2 x 1 mesh


@dataclass
class Case:
    """One method setup to compare: ``method`` (a ``MethodSpec``), its run config, tokenizer and the
    ``STEPS`` global batches; ``dtypes`` the keys of :data:`DTYPES` to run (a model that computes in float32
    whatever its parameters' dtype, e.g. an LLM embedding pooled ``.float()``, has no float64 run);
    ``prepare``, when set, changes the freshly built model in place (the same on every rank and in every run:
    e.g. LoRA's zero-initialised B made non-zero, so that every LoRA weight trains from the first step)."""

    method: Any
    cfg: Any
    tokenizer: Tokenizer
    batches: list[dict[str, Any]]
    dtypes: tuple[str, ...] = tuple(DTYPES)
    prepare: Callable[[torch.nn.Module], None] | None = None


def resolve_method(spec: str) -> Any:
    """``"module"`` (its ``METHOD``) or ``"module:ATTR"`` (e.g. ``vlp_llm2clip:LLM_METHOD``)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "METHOD")


def build_case(method: str | Any, world: str | Path, *, preset: str = "smoke", overrides: Sequence[str] = (),
               dtypes: Sequence[str] = tuple(DTYPES), prepare: Callable[[torch.nn.Module], None] | None = None,
               ) -> Case:
    """``method``'s ``preset`` with AdamW eps 1e-3, then ``overrides``; the tokenizer is
    ``model.text.tokenizer`` or, when empty, the world's; the batches come from the world's train shards."""
    method = resolve_method(method) if isinstance(method, str) else method
    unknown = set(dtypes) - set(DTYPES)
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be among {sorted(DTYPES)}, got {list(dtypes)}")
    cfg = method.preset(preset)
    # AdamW's eps 1e-3 (see vlp_core.testing.accumulate): with 1e-6 a gradient entry near zero turns float32
    # summation-order noise into a step of about lr, which measures the optimizer, not the parallelism.
    cfg.optim.eps = 1e-3
    apply_overrides(cfg, list(overrides))
    world = Path(world)
    source = cfg.model.text.tokenizer or str(world / "tokenizer.json")
    tokenizer = Tokenizer.from_pretrained(source, context_length=cfg.model.text.context_length)
    return Case(method, cfg, tokenizer, load_batches(world, method, cfg, tokenizer), tuple(dtypes), prepare)


def load_batches(world: Path, method: Any, cfg: Any, tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """The first ``B * STEPS`` samples of the world's train shards (in name order) through the method's
    adapter, collated into ``STEPS`` batches."""
    adapter = method.build_adapter(cfg, tokenizer)
    shards = sorted((world / "train").glob("*.tar"))
    samples: list[dict[str, Any]] = []
    for shard in shards:
        for sample in iter_samples(str(shard)):
            samples.append(adapter(sample))
            if len(samples) == B * STEPS:
                break
        if len(samples) == B * STEPS:
            break
    assert len(samples) == B * STEPS, f"{world}/train holds fewer than {B * STEPS} samples"
    batches = []
    for i in range(STEPS):
        batch = adapter.collate(samples[i * B:(i + 1) * B])
        batches.append({k: prepare_images(v, "cpu") if k == "images" else v for k, v in batch.items()})
    return batches


def rows(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    per = B // world
    return {k: v[rank * per:(rank + 1) * per] if isinstance(v, (torch.Tensor, list)) else v
            for k, v in batch.items()}


def build_module(case: Case, dtype: torch.dtype) -> TrainStep:
    """The seeded ``TrainStep`` (identical on every rank and in every run)."""
    torch.manual_seed(SEED)
    model = case.method.build_model(case.cfg, case.tokenizer)
    if case.prepare is not None:
        case.prepare(model)
    return TrainStep(model, case.method.build_loss(case.cfg)).to(dtype)


def train(case: Case, batches: list[dict[str, Any]], info: Any, mode: str, dtype: torch.dtype,
          stats: dict[str, Any] | None = None, **kw: Any) -> dict[str, torch.Tensor]:
    """``len(batches)`` trainer steps in ``mode`` (``info`` None: one process, whole batches); the parameters
    (``stats``, when given, receives ``frozen``: the names of the parameters that do not train, and
    ``sharded``: the number of FSDP modules)."""
    cfg = case.cfg
    module = build_module(case, dtype)
    batches = [{k: v.to(dtype) if k == "images" else v for k, v in b.items()} for b in batches]
    net = apply_parallel(module, info, parallel=mode, **kw) if info is not None else module
    if stats is not None:
        from torch.distributed.fsdp import FSDPModule

        stats["frozen"] = sorted(n for n, p in module.named_parameters() if not p.requires_grad)
        stats["sharded"] = sum(isinstance(m, FSDPModule) for m in module.modules())
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


def references(case: Case) -> dict[str, dict[str, torch.Tensor]]:
    """One-process parameters after the steps, per dtype tag; call before the process group exists (the
    losses gather over it when it does)."""
    return {tag: train(case, case.batches, None, "single", DTYPES[tag]) for tag in case.dtypes}


def compare(case: Case, refs: dict[str, dict[str, torch.Tensor]], info: Any) -> dict[str, Any]:
    """Every mode of :data:`MODES` on ``info``'s ranks against ``refs``; this rank's report (a collective).

    Keys per dtype tag: ``moved_<tag>`` (init vs reference, relative), ``static_<tag>`` (tensors the
    reference moves by at most 1e-5: see :mod:`vlp_core.testing.parallel`), ``<mode>_<tag>`` and
    ``fsdp_vs_ddp_<tag>``; ``frozen``: the parameters that do not train (``requires_grad`` off);
    ``sharded_<mode>``: the number of FSDP modules.
    """
    report: dict[str, Any] = {}
    for tag in case.dtypes:
        dtype, ref = DTYPES[tag], refs[tag]
        stats: dict[str, Any] = {}
        init = train(case, case.batches[:0], None, "single", dtype, stats)
        report["frozen"] = stats["frozen"]
        report[f"moved_{tag}"] = errors(init, ref)  # the steps moved every tensor (1 = by its whole size)
        # Tensors the run barely moves (an exact or near-zero gradient: a key bias, to which softmax is
        # shift-invariant, or a bias whose shift a LayerNorm removes): in float32 they hold summation noise.
        report[f"static_{tag}"] = sorted(k for k, v in errors(init, ref, relative=False).items() if v <= 1e-5)
        got = {}
        for mode, kw in MODES.items():
            stats = {}
            got[mode] = train(case, case.batches, info, mode, dtype, stats, **kw)
            report[f"sharded_{mode}"] = stats["sharded"]
            report[f"{mode}_{tag}"] = errors(got[mode], ref)
        report[f"fsdp_vs_ddp_{tag}"] = errors(got["fsdp"], got["ddp"])
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="vlp_core.clip", help="MODULE (its METHOD) or MODULE:ATTR")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--set", action="append", default=[], help="config override key=value")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="default: f32 and f64")
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = build_case(args.method, args.world, preset=args.preset, overrides=args.set,
                      dtypes=args.dtype or tuple(DTYPES))
    refs = references(case)  # no process group yet
    info = init_distributed(device="cpu")
    assert info.world_size == 2 and info.backend == "gloo", info
    gathered = all_gather_object(compare(case, refs, info))
    if info.rank == 0:
        Path(args.out).write_text(json.dumps(gathered, indent=1))
    cleanup()


if __name__ == "__main__":
    main()
