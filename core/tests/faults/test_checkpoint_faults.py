"""Checkpoint faults: damaged or uncommitted checkpoints, hostile pickles, write errors (a full disk).

- The newest checkpoint damaged (a file truncated by half, a byte flipped, its commit record removed), in
  both formats: ``resolve("latest")`` logs it and takes the previous one; named explicitly it is an error;
  pruning never lets a damaged newer one push out the last good one.
- A pickle outside the weights-only types (its payload would create a folder) is refused by
  ``CheckpointManager.load``, the DCP readers, ``clip-eval`` and ``clip-train --resume``, naming the file,
  and the payload never runs.
- ENOSPC injected at every write of a save (``torch.save``, each file's fsync, DCP's shard writer, the commit
  record): ``CheckpointWriteError`` naming the checkpoint and the OS error, no partial file left, earlier
  checkpoints intact; on 2 ranks every rank raises the same error whichever rank failed (also for an
  asynchronous save, through ``poll``).
- End to end: a tiny ``clip-train`` run whose newest checkpoint is truncated resumes from the previous one
  and ends bit-identical to the undamaged run.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlp_core.testing.dist import run_torchrun
from vlp_core.train.checkpoint import (
    COMPLETE,
    CheckpointManager,
    CheckpointWriteError,
    load_full_state,
    rng_state,
    set_rng_state,
)

pytestmark = pytest.mark.faults

WORKER = Path(__file__).parent / "workers" / "ckpt_write_worker.py"
TRAIN = "from vlp_core.clip.cli import train_main; raise SystemExit(train_main())"
ENOSPC_TEXT = os.strerror(errno.ENOSPC)  # "No space left on device"


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def state(step: int) -> dict:
    """A small checkpoint of the trainer's layout (tensors, RNG states, plain data positions and config)."""
    return {"step": step, "model": {"w": torch.full((512,), float(step))}, "optimizer": {"state": {}},
            "config": {"train": {"steps": 10, "lr": 1e-3}, "name": None},
            "ranks": [{"rng": rng_state(), "data": {0: {"raw": 64, "pick": {"state": 2**100}}}, "batches": step}]}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def skips(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "skipping" in r.getMessage()]


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, ENOSPC_TEXT)


@contextmanager
def failing_file_fsync(k: int, counter: list[int] | None = None):
    """The ``k``-th fsync of a regular file raises ENOSPC (k 0: none fails; ``counter`` counts them)."""
    real, seen = os.fsync, [0]

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen[0] += 1
            if counter is not None:
                counter[0] += 1
            if seen[0] == k:
                enospc()
        real(fd)

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real


def listing(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def tiny_module() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    module(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    return module, optimizer


def save_dcp(ckpts: CheckpointManager, step: int, module, optimizer, *, async_save: bool = False, record=None):
    path = ckpts.save_dcp(step, module, optimizer, {"step": step, "config": {"x": 1}},
                          record if record is not None else {"rng": rng_state(), "data": {0: step}},
                          async_save=async_save)
    ckpts.finish()
    return path


# --------------------------------------------------------------------------------------------------------------
# damaged checkpoints


def test_damaged_newest_file_checkpoint_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vlp")
    ckpts = CheckpointManager(tmp_path, keep=0)
    paths = [ckpts.save(state(s), s) for s in (1, 2, 3)]
    assert json.loads((tmp_path / "step_00000003.pt.commit").read_text())["size"] == paths[2].stat().st_size
    assert ckpts.resolve("latest") == paths[2] and skips(caplog) == []

    truncate(paths[2])  # the newest, cut by half
    assert ckpts.resolve("latest") == paths[1]
    [msg] = skips(caplog)
    assert str(paths[2]) in msg and "bytes, its commit record says" in msg and "truncated" in msg
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000003\.pt: it has \d+ bytes, .*truncated"):
        ckpts.resolve(str(paths[2]))  # named explicitly: an error
    with pytest.raises(ValueError, match="truncated"):
        CheckpointManager.load(paths[2])  # the size is checked before unpickling

    caplog.clear()
    (tmp_path / "step_00000002.pt.commit").unlink()  # the next one: its commit record missing
    assert [s for s, _ in ckpts.list()] == [1, 3]
    assert ckpts.resolve("latest") == paths[0]
    msgs = skips(caplog)
    assert len(msgs) == 2 and str(paths[1]) in msgs[1] and "no commit record" in msgs[1]
    assert ckpts.resolve(str(tmp_path)) == paths[0]  # a checkpoints folder: the same walk

    flip_byte(paths[0])  # same size, one byte changed: only the sha256 tells
    with pytest.raises(ValueError, match=r"step_00000001\.pt: it does not match the sha256"):
        CheckpointManager.verify(paths[0])
    CheckpointManager.verify(paths[0], checksums=False)
    # committed checkpoints exist but none is usable: an error, not a silent restart at step 0
    with pytest.raises(ValueError, match=r"no usable checkpoint in .*: 2 damaged, newest step_00000003\.pt"):
        ckpts.resolve("latest")
    # only uncommitted files (a .pt without its record, an unfinished .tmp): nothing to resume, a fresh start
    other = CheckpointManager(tmp_path / "other", keep=0)
    other.folder.mkdir()
    shutil.copy(paths[1], other.folder / paths[1].name)
    (other.folder / "step_00000009.tmp").mkdir()
    assert other.list() == [] and other.resolve("latest") is None


def test_pruning_never_drops_the_last_good_checkpoint(tmp_path: Path) -> None:
    ckpts = CheckpointManager(tmp_path, keep=2)
    p4, p6 = ckpts.save(state(4), 4), ckpts.save(state(6), 6)
    truncate(p6)  # the newest is damaged; a run resumed from step 4 then saves step 5
    (tmp_path / "step_00000001.pt.tmp").write_bytes(b"x")  # leftovers of saves cut short
    (tmp_path / "step_00000002.tmp").mkdir()
    p5 = ckpts.save(state(5), 5)
    # counted among the newest two, the damaged step 6 would have pushed step 4 out
    assert [s for s, _ in ckpts.list()] == [4, 5, 6] and p4.is_file()
    assert ckpts.resolve("latest") == p5
    p6 = ckpts.save(state(6), 6)  # the resumed run reaches step 6: the damaged file is replaced
    CheckpointManager.verify(p6)
    assert sorted(listing(tmp_path)) == ["step_00000005.pt", "step_00000005.pt.commit", "step_00000006.pt",
                                         "step_00000006.pt.commit"]


def test_damaged_newest_dcp_folder_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="vlp")
    module, optimizer = tiny_module()
    ckpts = CheckpointManager(tmp_path, keep=0)
    paths = [save_dcp(ckpts, s, module, optimizer) for s in (1, 2, 3)]
    assert ckpts.resolve("latest") == paths[2]

    shard = sorted(paths[2].glob("*.distcp"))[0]
    truncate(shard)
    assert ckpts.resolve("latest") == paths[1]
    [msg] = skips(caplog)
    assert str(paths[2]) in msg and shard.name in msg and "truncated" in msg
    with pytest.raises(ValueError, match=rf"{shard.name} has \d+ bytes"):
        load_full_state(paths[2])

    caplog.clear()
    (paths[1] / COMPLETE).unlink()  # the commit record missing
    assert [s for s, _ in ckpts.list()] == [1, 3]
    assert ckpts.resolve("latest") == paths[0]
    assert "no commit record (COMPLETE)" in skips(caplog)[1]

    flip_byte(paths[0] / "meta.pt")  # side records are small: their sha256 is checked
    with pytest.raises(ValueError, match=r"meta\.pt does not match the sha256"):
        CheckpointManager.verify(paths[0])


# --------------------------------------------------------------------------------------------------------------
# safe loading


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.standard_normal()  # numpy's cached gaussian is part of its state
    path = CheckpointManager(tmp_path).save(state(1), 1)
    want = (random.random(), np.random.standard_normal(3), torch.rand(3))
    saved = torch.load(path, weights_only=True)  # plain torch: no allowlist needed
    set_rng_state(saved["ranks"][0]["rng"])
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert want[0] == got[0] and np.array_equal(want[1], got[1]) and torch.equal(want[2], got[2])
    set_rng_state({**rng_state(), "numpy": np.random.get_state()})  # numpy's own tuple is still accepted


def test_hostile_pickles_are_refused_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     cli_in_process) -> None:
    from vlp_core.cli import eval_main
    from vlp_core.clip import METHOD

    marker = tmp_path / "payload-ran"
    run = tmp_path / "run"
    hostile = state(3)
    hostile["config"] = Payload(marker)
    path = CheckpointManager(run / "checkpoints").save(hostile, 3)  # even with a valid commit record
    assert CheckpointManager(run / "checkpoints").resolve("latest") == path
    with pytest.raises(ValueError, match=rf"{path} is a pickle that is not weights-only \(it needs posix\.mkdir\)"):
        CheckpointManager.load(path)
    for target in (path, run):  # clip-eval on the file and on its run folder
        assert eval_main(METHOD, [str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("clip-eval: error: ") and f"{path} is a pickle" in err[0], err

    # a DCP folder whose per-rank record is hostile: refused by both DCP readers
    module, optimizer = tiny_module()
    folder = save_dcp(CheckpointManager(tmp_path / "dcp"), 2, module, optimizer,
                      record={"rng": rng_state(), "data": Payload(marker)})
    with pytest.raises(ValueError, match=r"ranks/rank_00000\.pt is a pickle that is not weights-only"):
        load_full_state(folder)
    with pytest.raises(ValueError, match=r"ranks/rank_00000\.pt is a pickle that is not weights-only"):
        CheckpointManager.load_dcp(folder, *tiny_module())
    assert not marker.exists()  # no payload ran
    torch.load(path, weights_only=False)  # ...though a plain pickle load would have run it
    assert marker.is_dir()


# --------------------------------------------------------------------------------------------------------------
# write errors (a full disk)


def assert_write_error(e: pytest.ExceptionInfo[CheckpointWriteError], path: Path) -> None:
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC and e.value.path == path
    assert str(e.value) == f"cannot write checkpoint {path}: {ENOSPC_TEXT}"


def test_enospc_at_file_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpts = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2):
        ckpts.save(state(s), s)
    before = listing(tmp_path)
    real_save = torch.save

    def half_then_enospc(obj, f, *args, **kwargs):  # the disk fills up in the middle of the file
        real_save(obj, f, *args, **kwargs)
        truncate(Path(f))
        enospc()

    monkeypatch.setattr(torch, "save", half_then_enospc)
    with pytest.raises(CheckpointWriteError) as e:
        ckpts.save(state(3), 3)
    assert_write_error(e, tmp_path / "step_00000003.pt")
    monkeypatch.undo()
    assert listing(tmp_path) == before
    for k in (1, 2):  # the file's fsync, then the commit record's
        with failing_file_fsync(k), pytest.raises(CheckpointWriteError) as e:
            ckpts.save(state(3), 3)
        assert_write_error(e, tmp_path / "step_00000003.pt")
        assert listing(tmp_path) == before  # no .tmp, no uncommitted .pt; steps 1 and 2 untouched
    for _, p in ckpts.list():
        CheckpointManager.verify(p)
    counted = [0]
    with failing_file_fsync(0, counted):
        ckpts.save(state(3), 3)
    assert counted[0] == 2 and [s for s, _ in ckpts.list()] == [2, 3]


@pytest.mark.parametrize("async_save", [False, True])
def test_enospc_at_dcp_checkpoint_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool) -> None:
    import torch.distributed.checkpoint.filesystem as dcp_fs

    module, optimizer = tiny_module()
    ckpts = CheckpointManager(tmp_path, keep=2)
    save_dcp(ckpts, 1, module, optimizer)
    before = listing(tmp_path)
    final = tmp_path / "step_00000002"

    monkeypatch.setattr(dcp_fs, "_write_item", enospc)  # DCP's shard writer
    with pytest.raises(CheckpointWriteError) as e:
        ckpts.save_dcp(2, module, optimizer, {"step": 2}, {"data": 2}, async_save=async_save)
        if async_save:  # the background write fails: poll (non-blocking, at each step) raises it
            import time

            deadline = time.monotonic() + 30
            while ckpts.pending and time.monotonic() < deadline:
                ckpts.poll()
                time.sleep(0.01)
    assert_write_error(e, final)
    monkeypatch.undo()
    assert listing(tmp_path) == before and not ckpts.pending
    ckpts.finish()  # nothing pending any more

    counted = [0]
    with failing_file_fsync(0, counted):
        save_dcp(ckpts, 2, module, optimizer, async_save=async_save)
    shutil.rmtree(final)
    # side records (rank, meta), shard, DCP's .metadata, the commit record
    assert counted[0] >= 5
    for k in range(1, counted[0] + 1):  # every file write of the save fails in turn
        with failing_file_fsync(k), pytest.raises(CheckpointWriteError) as e:
            save_dcp(ckpts, 2, module, optimizer, async_save=async_save)  # finish() raises the async one
        assert_write_error(e, final)
        assert listing(tmp_path) == before, k
    CheckpointManager.verify(tmp_path / "step_00000001")


def test_enospc_on_one_rank_raises_on_every_rank(tmp_path: Path) -> None:
    run_torchrun(WORKER, 2, str(tmp_path), timeout=180)
    results = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1]  # the same one-line error on both ranks
    final = tmp_path / "checkpoints"
    for scenario, rank, step in [("record", 1, 2), ("shard", 1, 2), ("commit", 0, 2), ("async", 1, 3)]:
        message = results[0][scenario]
        assert message is not None and "\n" not in message, scenario
        assert message.endswith(f"cannot write checkpoint {final / f'step_{step:08d}'} (rank {rank}): "
                                f"{ENOSPC_TEXT}"), (scenario, message)
    assert results[0]["async"].startswith("poll: ")
    ckpts = CheckpointManager(final)
    assert [s for s, _ in ckpts.list()] == [1, 6] and not list(final.glob("*.tmp"))
    for _, p in ckpts.list():
        CheckpointManager.verify(p)


# --------------------------------------------------------------------------------------------------------------
# end to end


def clip_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", TRAIN, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture
def cli_in_process(capsys: pytest.CaptureFixture[str]):
    """Call ``clip-train``'s entry point here; afterwards drop the log handler it bound to the captured stderr."""
    from vlp_core.cli import train_main
    from vlp_core.clip import METHOD

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): the same reduction order
        try:
            code = train_main(METHOD, list(args))
        finally:
            torch.set_num_threads(threads)
        return code, capsys.readouterr().err

    yield run
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vlp_rank_handler", False):
            root.removeHandler(h)


def test_resume_latest_skips_a_truncated_newest_checkpoint(tiny_world: Path, tmp_path: Path, cli_in_process) -> None:
    run = tmp_path / "run"
    common = ["--preset", "smoke", "--set", f"data.world_dir={tiny_world}", "--output-dir", str(run),
              "--set", f"model.text.tokenizer={tiny_world}/tokenizer.json", "--set", "eval.at_end=false",
              "--set", "train.progress=false", "--workers", "0", "--steps", "4", "--set", "train.save_every=2"]
    r = clip_train(*common)  # a real run, in a process of its own
    assert r.returncode == 0, r.stderr
    ckpts = CheckpointManager(run / "checkpoints")
    assert [s for s, _ in ckpts.list()] == [2, 4]
    newest = ckpts.latest()
    reference = CheckpointManager.load(newest)["model"]
    truncate(newest)

    # the resumed run (clip-train's entry point called here, to spare a process start)
    code, err = cli_in_process(*common, "--resume", "latest")
    assert code == 0, err
    assert f"skipping checkpoint {newest}" in err and "truncated" in err
    assert f"resumed from {run / 'checkpoints' / 'step_00000002.pt'} at step 2" in err
    CheckpointManager.verify(newest)  # rewritten by the resumed run
    got = CheckpointManager.load(newest)["model"]
    assert got.keys() == reference.keys()
    for k in reference:  # exact resume from the previous checkpoint: the same step-4 model
        assert torch.equal(got[k], reference[k]), k

    # --resume of a checkpoint holding a pickled payload: refused naming the file, the payload never runs
    marker = tmp_path / "payload-ran"
    saved = CheckpointManager.load(newest)
    saved["config"] = Payload(marker)
    hostile = CheckpointManager(run / "checkpoints", keep=0).save(saved, 5)
    code, err = cli_in_process(*common, "--resume", "latest", "--steps", "6")
    assert code == 2, err
    assert f"clip-train: error: {hostile} is a pickle that is not weights-only" in err and "Traceback" not in err
    assert not marker.exists()
