"""Skipped-sample counts summed over ranks, reported by rank 0 once per log step.

Every data loader consumer counts what it skips (by reason: ``bad_image``, ``bad_shard``...) and attaches a
few example messages to its batches (:class:`vlp_core.data.wds.BatchMeta`). Logging those on every rank for
every batch floods the log of a large job: with a few percent of bad samples, 256 ranks would print hundreds
of lines per step. Instead each rank keeps its own running totals, and at every log step all ranks sum them
with one small all-reduce of a count vector in a fixed order of reasons; rank 0 then logs one line (counts
since the previous log step and run totals) and at most :data:`PER_REASON` examples of each reason, and
:data:`MAX_EXAMPLES` in all, from its own consumers, and the trainer writes the totals to TensorBoard as
``data/skipped_<reason>``.

A reason outside :data:`REASONS` (a method's own) is added to the order on every rank at once: the vector
carries a count of such names, and when it is non-zero the ranks gather the names (rare: once per new name).

Each rank's totals are stored in its checkpoint record, so a resumed run continues the global totals; the
totals of an older checkpoint (only rank 0's) are taken as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist

from vlp_core.distributed import all_gather_object, all_reduce_sum, is_initialized, is_main

__all__ = ["REASONS", "PER_REASON", "MAX_EXAMPLES", "SkipLog", "sum_counts"]

log = logging.getLogger("vlp")

# The core's reasons, in the order of the all-reduced vector (methods' own reasons are appended at run time).
REASONS = ("bad_image", "no_image", "empty_caption", "bad_caption", "bad_json", "missing_member", "bad_array",
           "missing_shard", "corrupt_shard", "bad_shard")
PER_REASON = 2  # examples of one reason logged per log interval
MAX_EXAMPLES = 5  # examples logged per log interval in all


def sum_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Per-reason sums of several count dicts (e.g. every rank's checkpoint record)."""
    out: dict[str, int] = {}
    for c in counts:
        for reason, n in c.items():
            out[reason] = out.get(reason, 0) + int(n)
    return out


def _device() -> torch.device:
    """Where the count vector must live for the process group's backend (NCCL reduces CUDA tensors only)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class SkipLog:
    """The run's global skip totals and the examples of the current log interval (see the module doc).

    ``totals`` are the global totals at the last :meth:`reduce` (or at the checkpoint a run resumed from):
    the same on every rank. :meth:`reduce` is a collective: every rank calls it at the same steps.
    """

    def __init__(self, totals: Mapping[str, int] | None = None) -> None:
        self.totals: dict[str, int] = {k: int(v) for k, v in (totals or {}).items() if int(v)}
        # The same on every rank: the core's reasons, then the others in the order the ranks learnt them.
        self.order: list[str] = [*REASONS, *sorted(set(self.totals) - set(REASONS))]
        self.examples: list[tuple[str, str]] = []

    def note(self, examples: Iterable[tuple[str, str]]) -> None:
        """Keep a few of a batch's example skips ``(reason, message)`` for the next report (rank 0 only)."""
        if not is_main():
            return
        for reason, message in examples:
            if len(self.examples) >= MAX_EXAMPLES:
                return
            if sum(r == reason for r, _ in self.examples) < PER_REASON:
                self.examples.append((reason, message))

    def reduce(self, local: Mapping[str, int]) -> dict[str, int]:
        """Global totals from every rank's own running totals ``local``; a collective, on every rank.

        Returns the totals (also kept in ``totals``) of the reasons that have occurred.
        """
        new = sorted(set(local) - set(self.order))
        device = _device()
        vec = torch.tensor([int(local.get(r, 0)) for r in self.order] + [len(new)], dtype=torch.int64,
                           device=device)
        counts = all_reduce_sum(vec).tolist()
        totals = dict(zip(self.order, counts[:-1]))
        if counts[-1]:  # some rank met a reason outside the order: every rank learns the same names
            names = sorted(set().union(*all_gather_object(new)) - set(self.order))
            extra = torch.tensor([int(local.get(r, 0)) for r in names], dtype=torch.int64, device=device)
            totals.update(zip(names, all_reduce_sum(extra).tolist()))
            self.order.extend(names)
        self.totals = {r: int(n) for r, n in totals.items() if n}
        return dict(self.totals)

    def report(self, step: int, before: Mapping[str, int]) -> None:
        """Rank 0: one line with the skips since ``before`` (the totals of the previous report) and the run
        totals, then this interval's examples; nothing when nothing was skipped since. Clears the examples."""
        examples, self.examples = self.examples, []
        if not is_main():
            return
        since = {r: n - int(before.get(r, 0)) for r, n in self.totals.items() if n > int(before.get(r, 0))}
        if not since:
            return
        log.warning("skipped samples at step %d: %d since the last log (%s); run total %d (%s)", step,
                    sum(since.values()), _fmt(since), sum(self.totals.values()), _fmt(self.totals))
        for reason, message in examples:
            log.warning("skipped sample (%s): %s", reason, message)

    def update(self, step: int, local: Mapping[str, int]) -> dict[str, int]:
        """:meth:`reduce` then :meth:`report`: what a log step does on every rank; returns the totals."""
        before = dict(self.totals)
        totals = self.reduce(local)
        self.report(step, before)
        return totals


def _fmt(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
