"""Autograd-aware collectives for the distributed contrastive losses.

Every function works without a process group (or with world size 1): gathers are the identity and a
neighbour exchange with oneself returns the input.

Gradient convention (what makes the losses exact under DDP): each rank back-propagates only *its own* loss;
the backward of a gather/exchange routes the gradient that rank ``q``'s loss puts on rank ``p``'s features
back to rank ``p`` and sums it there. DDP then averages the parameter gradients over ranks, so the result is
the gradient of the mean of the per-rank losses.

Requirement: **all ranks pass tensors of the same shape** (equal per-rank batch, e.g. ``drop_last=True``).
For CPU tensors :func:`all_gather_with_grad` checks this with one tiny extra all-gather and raises a clear
``ValueError``; on accelerators that check would force a host sync every step, so it only runs when the
environment variable ``VLP_DIST_CHECKS=1`` is set. A mismatch there otherwise errors or hangs in the backend.

Tensor-name legend:
    B: per-rank batch, W: world size, N = W*B: global batch, D: feature dim (any trailing dims allowed).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from vlp_core.distributed.utils import get_rank, get_world_size, is_initialized

__all__ = [
    "all_gather_with_grad",
    "all_gather_no_grad",
    "neighbour_exchange_with_grad",
    "neighbour_exchange_bidir_with_grad",
]


def _check_equal_shapes(x: torch.Tensor, what: str) -> None:
    if x.device.type != "cpu" and os.environ.get("VLP_DIST_CHECKS", "0") != "1":
        return
    shape_1S = torch.tensor([list(x.shape)], dtype=torch.long, device=x.device)
    shapes_WS = [torch.empty_like(shape_1S) for _ in range(get_world_size())]
    dist.all_gather(shapes_WS, shape_1S)
    shapes = [tuple(s[0].tolist()) for s in shapes_WS]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(
            f"{what} needs the same tensor shape on every rank (equal per-rank batch: use drop_last=True); "
            f"got shapes by rank {shapes}"
        )


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: all_gather + cat in rank order. Backward: sum the gradients of all ranks' copies, slice ours.

    gloo has no reduce_scatter, so the backward is an all_reduce of the full [N, ...] gradient followed by a
    slice; it moves W times more data than a reduce-scatter but the tensors are only N x D.
    """

    @staticmethod
    def forward(ctx: Any, x_BD: torch.Tensor) -> torch.Tensor:
        world, rank = get_world_size(), get_rank()
        x_BD = x_BD.contiguous()
        parts_WBD = [torch.empty_like(x_BD) for _ in range(world)]
        dist.all_gather(parts_WBD, x_BD)
        ctx.rank, ctx.batch = rank, x_BD.shape[0]
        return torch.cat(parts_WBD, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_ND: torch.Tensor) -> torch.Tensor:
        # Clone: autograd may hand the same gradient buffer to other consumers, so never reduce it in place.
        grad_ND = grad_ND.contiguous().clone()
        dist.all_reduce(grad_ND, op=dist.ReduceOp.SUM)
        return grad_ND[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def all_gather_with_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x_BD`` from all ranks along dim 0 (rank order), with the exact gradient.

    Backward sums the gradients arriving at every rank's copy of this rank's slice and returns that slice's
    gradient to this rank (see the module docstring for why this is exact under the DDP mean).

    Args:
        x_BD: ``[B, ...]`` with the same shape on every rank.

    Returns:
        ``[W*B, ...]``; ``x_BD`` itself without a process group.
    """
    if not is_initialized() or get_world_size() == 1:
        return x_BD
    _check_equal_shapes(x_BD, "all_gather_with_grad")
    return _AllGatherWithGrad.apply(x_BD)


@torch.no_grad()
def all_gather_no_grad(x_BD: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x_BD`` from all ranks along dim 0 (rank order), outside autograd (result is detached)."""
    if not is_initialized() or get_world_size() == 1:
        return x_BD.detach()
    _check_equal_shapes(x_BD, "all_gather_no_grad")
    x_BD = x_BD.detach().contiguous()
    parts_WBD = [torch.empty_like(x_BD) for _ in range(get_world_size())]
    dist.all_gather(parts_WBD, x_BD)
    return torch.cat(parts_WBD, dim=0)


def _p2p(sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
    """Post all sends and receives as one batch and wait for them (blocking)."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
    for req in dist.batch_isend_irecv(ops):
        req.wait()


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to ``to_rank``, receive a same-shaped tensor from ``from_rank``; backward runs reversed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, to_rank: int, from_rank: int) -> torch.Tensor:
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        x = x.contiguous()
        out = torch.empty_like(x)
        _p2p([(x, to_rank)], [(out, from_rank)])
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # The gradient of what we received belongs to from_rank's input; ours arrives from to_rank.
        grad_out = grad_out.contiguous()
        grad_in = torch.empty_like(grad_out)
        _p2p([(grad_out, ctx.from_rank)], [(grad_in, ctx.to_rank)])
        return grad_in, None, None


def neighbour_exchange_with_grad(x: torch.Tensor, *, to_rank: int, from_rank: int) -> torch.Tensor:
    """Send ``x`` to ``to_rank`` and return the tensor ``from_rank`` sent to us, differentiably.

    Every rank must call this in the same step with a consistent pattern (e.g. all shift right by one) and
    the same shape. Backward sends the received tensor's gradient back to ``from_rank`` and receives this
    rank's gradient from ``to_rank``.

    Args:
        x: Tensor to send.
        to_rank: Destination rank.
        from_rank: Source rank.

    Returns:
        A tensor shaped like ``x``; ``x`` itself without a process group.
    """
    if not is_initialized() or get_world_size() == 1:
        return x
    return _NeighbourExchange.apply(x, to_rank, from_rank)


class _NeighbourExchangeBidir(torch.autograd.Function):
    """Send one tensor left and one right, receive from both, as one p2p batch (one latency, not two)."""

    @staticmethod
    def forward(
        ctx: Any, to_left: torch.Tensor, to_right: torch.Tensor, left_rank: int, right_rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.left_rank, ctx.right_rank = left_rank, right_rank
        to_left, to_right = to_left.contiguous(), to_right.contiguous()
        from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
        _p2p(
            [(to_left, left_rank), (to_right, right_rank)], [(from_left, left_rank), (from_right, right_rank)]
        )
        return from_left, from_right

    @staticmethod
    def backward(
        ctx: Any, g_from_left: torch.Tensor, g_from_right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        # from_left was the left rank's to_right: its gradient goes back left; symmetric for the right.
        g_from_left, g_from_right = g_from_left.contiguous(), g_from_right.contiguous()
        g_to_left, g_to_right = torch.empty_like(g_from_right), torch.empty_like(g_from_left)
        _p2p(
            [(g_from_left, ctx.left_rank), (g_from_right, ctx.right_rank)],
            [(g_to_left, ctx.left_rank), (g_to_right, ctx.right_rank)],
        )
        return g_to_left, g_to_right, None, None


def neighbour_exchange_bidir_with_grad(
    to_left: torch.Tensor, to_right: torch.Tensor, *, left_rank: int, right_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send ``to_left`` to ``left_rank`` and ``to_right`` to ``right_rank`` at once, differentiably.

    Needs ``left_rank != right_rank`` (world size >= 3): with two peers being the same rank the two
    messages could not be told apart.

    Returns:
        ``(from_left, from_right)``: what the left rank sent right and what the right rank sent left.
    """
    if not is_initialized() or get_world_size() == 1:
        return (
            to_right,
            to_left,
        )  # with oneself on both sides, the message sent right comes back from the left
    if left_rank == right_rank:
        raise ValueError(
            "neighbour_exchange_bidir_with_grad needs distinct left and right ranks (world >= 3)"
        )
    return _NeighbourExchangeBidir.apply(to_left, to_right, left_rank, right_rank)
