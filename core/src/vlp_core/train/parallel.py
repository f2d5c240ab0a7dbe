"""Data parallelism for the trainer: DDP, FSDP2 (``fully_shard``) and HSDP, on PyTorch's own stack.

``train.parallel``:

- ``ddp``: the whole ``TrainStep`` (model + loss) replicated and wrapped in ``DistributedDataParallel``; with
  ``train.compile`` the DDP-wrapped module is compiled (``torch.compile(DDP(m))``), so DDP's bucketed
  all-reduce can overlap the backward (compiling inside DDP would hide the gradient hooks' order).
- ``fsdp``: FSDP2, the approach of torchtitan. Every block of every tower (any submodule exposing a
  ``.blocks`` list: ``VisionTower``, ``TextTransformer``, ``HFTextTower``'s layers) is compiled on its own
  (``train.compile``) and then sharded with ``fully_shard``; then the loss module (its temperature and bias,
  kept in fp32) and the root ``TrainStep`` with what is left (embeddings, projections). Parameters become
  ``DTensor`` shards over a 1-D mesh of all ranks; gradients are reduce-scattered (averaged, like DDP).
- ``hsdp``: the same over a 2-D mesh ``(replicate, shard)``: parameters sharded within a group of
  ``world / hsdp_replicate`` ranks and replicated across ``hsdp_replicate`` groups (0: one group per node,
  ``LOCAL_WORLD_SIZE`` ranks each).

On CUDA with bf16 precision the FSDP modules use ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
(the loss module keeps fp32 parameters); on CPU, or with fp32, parameters stay fp32. Activation
checkpointing stays the towers' own per-block ``set_grad_checkpointing`` (non-reentrant), which composes with
FSDP2: the recompute all-gathers the block again.

One process (world size 1) under ``fsdp`` still shards over a mesh of one rank when a process group exists,
and falls back to the plain module otherwise.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from vlp_core.distributed import DistInfo, wrap_ddp

__all__ = ["apply_parallel", "tower_blocks", "is_sharded", "build_mesh", "set_gradient_sync", "full_norm",
           "replicated_params", "sync_replicated_grads", "split_scalar_groups"]

log = logging.getLogger("vlp")


def tower_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of every tower inside ``module`` (submodules with a ``.blocks`` list), each once, in order."""
    seen: set[int] = set()
    out: list[nn.Module] = []
    for sub in module.modules():
        if sub is module or id(sub) in seen:
            continue
        try:
            blocks = getattr(sub, "blocks", None)
        except ValueError:  # an HF model whose layer list cannot be found: nothing to shard per block
            continue
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            continue
        for block in blocks:
            if id(block) not in seen:
                seen.add(id(block))
                out.append(block)
    return out


def build_mesh(info: DistInfo, parallel: str, hsdp_replicate: int = 0):
    """The device mesh: 1-D ``("shard",)`` for fsdp, 2-D ``("replicate", "shard")`` for hsdp."""
    from torch.distributed.device_mesh import init_device_mesh

    device_type = info.device.type
    if parallel == "fsdp":
        return init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("shard",))
    replicate = hsdp_replicate or max(1, info.world_size // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size)))
    if info.world_size % replicate:
        raise ValueError(f"train.hsdp_replicate={replicate} does not divide the world size {info.world_size}")
    return init_device_mesh(device_type, (replicate, info.world_size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def _lr_scales(module: nn.Module) -> dict[str, float]:
    return {n: float(p.lr_scale) for n, p in module.named_parameters() if hasattr(p, "lr_scale")}


def _restore_lr_scales(module: nn.Module, scales: dict[str, float]) -> None:
    """``fully_shard`` replaces each parameter by a new DTensor parameter: carry the layer-wise lr scale over."""
    for name, p in module.named_parameters():
        if name in scales:
            p.lr_scale = scales[name]  # type: ignore[attr-defined]


def apply_parallel(step_module: nn.Module, info: DistInfo, *, parallel: str = "ddp", compile: bool = False,
                   hsdp_replicate: int = 0, bf16_params: bool = False) -> nn.Module:
    """Wrap ``step_module`` (a ``TrainStep`` on ``info.device``) for training; returns the module to call.

    ``ddp``: returns ``[compile](DDP(step_module))`` (DDP only when world size > 1). ``fsdp``/``hsdp``: shards
    ``step_module`` in place (its parameters become DTensors; names are unchanged) and returns it. Build the
    optimizer *after* this call, from ``step_module``'s (new) parameters.
    """
    if parallel == "ddp":
        module = wrap_ddp(step_module, info)
        return torch.compile(module) if compile else module
    if parallel not in ("fsdp", "hsdp"):
        raise ValueError(f"train.parallel must be ddp, fsdp or hsdp, got {parallel!r}")
    import torch.distributed as dist

    if not dist.is_initialized():
        log.info("train.parallel=%s without a process group: training the plain module", parallel)
        if compile:
            for block in tower_blocks(step_module):
                block.compile()
        return step_module
    _shard(step_module, build_mesh(info, parallel, hsdp_replicate), compile=compile,
           bf16_params=bf16_params and info.device.type == "cuda")
    return step_module


def _scalars(module: nn.Module) -> list[nn.Parameter]:
    """The 0-dim parameters (temperatures, biases of the losses): ``fully_shard`` cannot shard them."""
    return [p for p in module.parameters() if p.ndim == 0]


def _shard(step_module: nn.Module, mesh, *, compile: bool, bf16_params: bool) -> None:
    """Per-block ``fully_shard``, then the loss module, then the root; 0-dim parameters stay replicated.

    FSDP2 shards along dim 0 and refuses scalar parameters, so the scalars (a loss's ``logit_scale`` and
    ``logit_bias``) are left out of every FSDP group (``ignored_params``): they stay plain fp32 tensors, and
    :func:`sync_replicated_grads` averages their gradients over all ranks before the optimizer step, as DDP
    would. Every other parameter of the loss module (a method's learnable head, say) is sharded with it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    scales = _lr_scales(step_module)
    scalars = set(_scalars(step_module))
    fp32 = MixedPrecisionPolicy()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params else fp32
    blocks = tower_blocks(step_module)
    for i, block in enumerate(blocks):
        if compile:
            block.compile()  # in place: the state-dict keys keep their names (no ``_orig_mod``)
        # The last block is all-gathered again by the backward at once: keep it (torchtitan's choice).
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1,
                    ignored_params=scalars & set(block.parameters()) or None)
    loss = getattr(step_module, "loss", None)
    if isinstance(loss, nn.Module) and any(p not in scalars for p in loss.parameters()):
        fully_shard(loss, mesh=mesh, mp_policy=fp32, ignored_params=scalars & set(loss.parameters()) or None)
    fully_shard(step_module, mesh=mesh, mp_policy=policy, reshard_after_forward=False,
                ignored_params=scalars or None)
    step_module._vlp_replicated = sorted(scalars, key=lambda p: _name_of(step_module, p))  # type: ignore[assignment]
    _restore_lr_scales(step_module, scales)


def _name_of(module: nn.Module, param: nn.Parameter) -> str:
    return next(n for n, p in module.named_parameters() if p is param)


def replicated_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters :func:`apply_parallel` left replicated under FSDP (empty otherwise)."""
    return list(getattr(module, "_vlp_replicated", []))


def sync_replicated_grads(module: nn.Module) -> None:
    """Average the gradients of the replicated (non-sharded) parameters over all ranks (one all-reduce)."""
    params = [p for p in replicated_params(module) if p.requires_grad]
    if not params:
        return
    import torch.distributed as dist

    flat = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat, strict=True):
        p.grad = g.clone()


def split_scalar_groups(optimizer: torch.optim.Optimizer) -> None:
    """Split each param group into its tensors and its 0-dim parameters (same settings); before any step.

    Under FSDP the scalars are the plain (replicated) parameters among DTensors, and the foreach/fused AdamW
    kernels take one list per group and cannot mix the two. Done in every parallel mode, so the optimizer's
    group layout (which DCP checkpoints record) is the same under DDP, FSDP and one process. Call before
    building the scheduler (it records one lr per group).
    """
    groups = []
    for group in optimizer.param_groups:
        tensors = [p for p in group["params"] if p.ndim > 0]
        scalars = [p for p in group["params"] if p.ndim == 0]
        for params in (tensors, scalars):
            if params:
                groups.append({**group, "params": params})
    optimizer.param_groups[:] = groups


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` was sharded by FSDP2 (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def set_gradient_sync(module: nn.Module, enabled: bool) -> None:
    """FSDP2: skip (``False``) or do the gradient reduce-scatter of the next backward (accumulation)."""
    if is_sharded(module):
        module.set_requires_gradient_sync(enabled)  # type: ignore[operator]


def full_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` (plain tensors, DTensors or both) to ``max_norm``; the total norm.

    DTensor gradients' norm is reduced over the mesh (``full_tensor``), so every rank clips with the global
    norm that one process would compute; plain gradients (DDP, or the replicated scalars under FSDP) are
    already identical on every rank.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    parts, groups = [], []
    for want_dtensor in (True, False):
        group = [p for p in params if p.grad is not None and isinstance(p.grad, DTensor) == want_dtensor]
        if not group:
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0, error_if_nonfinite=False,
                                             foreach=True)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        groups.append(group)
    dtype = parts[0].dtype if len(parts) == 1 else torch.promote_types(parts[0].dtype, parts[1].dtype)
    total = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in parts]))
    if max_norm < float("inf"):
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
