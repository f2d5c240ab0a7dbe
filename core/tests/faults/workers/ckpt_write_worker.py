"""torchrun worker: DCP checkpoint write failures injected on ONE rank must raise the same error on EVERY rank.

Usage: ``ckpt_write_worker.py OUT``. Each rank writes ``OUT/rank_<r>.json``: scenario -> the message of the
``CheckpointWriteError`` it raised (None if it raised nothing). Scenarios, each failing on one rank only:
``record`` (rank 1's side record), ``shard`` (rank 1's shard write), ``commit`` (rank 0's commit record),
``async`` (rank 1's shard write in the background save: ``poll`` then ``finish``). Steps 1 and 6 save cleanly.
Rank 1's ``shutil.rmtree`` is slowed down, so that a rank other than 0 removing a failed save's folder would
delete the folder of the next save (the race this worker once lost at random).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_fs
from torch import nn

import vlp_core.train.checkpoint as ckpt_mod
from vlp_core.train.checkpoint import CheckpointManager, CheckpointWriteError


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@contextmanager
def patched(obj, name, value, active: bool):
    old = getattr(obj, name)
    if active:
        setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def first_file_fsync_fails(real=os.fsync):
    def fsync(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):
            enospc()
        return real(fd)
    return fsync


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    ckpts = CheckpointManager(out / "checkpoints", keep=0)

    def save(step: int, *, async_save: bool = False) -> None:
        ckpts.save_dcp(step, module, optimizer, {"step": step}, {"rank": rank}, async_save=async_save)

    if rank == 1:  # a slow rank: a removal of the failed save's folder that lands after rank 0 made it again
        real_rmtree = shutil.rmtree

        def slow_rmtree(path, *args, **kwargs):
            time.sleep(0.5)
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = slow_rmtree

    results: dict[str, str | None] = {}
    save(1)
    for name, obj, attr, value, on in [("record", os, "fsync", first_file_fsync_fails(), 1),
                                       ("shard", dcp_fs, "_write_item", enospc, 1),
                                       ("commit", ckpt_mod, "_write_json", enospc, 0)]:
        results[name] = None
        try:
            with patched(obj, attr, value, rank == on):
                save(2)
        except CheckpointWriteError as e:
            results[name] = str(e)
    results["async"] = None
    with patched(dcp_fs, "_write_item", enospc, rank == 1):
        save(3, async_save=True)
        try:
            deadline = time.monotonic() + 60
            while ckpts.pending and time.monotonic() < deadline:  # what the loop does at each step
                ckpts.poll()
                time.sleep(0.05)
        except CheckpointWriteError as e:
            results["async"] = "poll: " + str(e)
        try:
            ckpts.finish()  # a no-op once poll raised
        except CheckpointWriteError as e:
            results["async"] = "finish: " + str(e)
    save(6)
    (out / f"rank_{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
