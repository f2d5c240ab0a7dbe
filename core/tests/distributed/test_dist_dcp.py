"""DCP checkpoints of an FSDP2 ``clip-train --preset smoke`` run on 2 gloo ranks: resume on 2 ranks and on 1.

Run A trains 4 steps (2 micro-batches each) uninterrupted under ``train.parallel=fsdp`` (DCP folders by
default), saving at steps 2 and 4 with ``train.async_save``, and evaluates at the end (on a gathered,
unsharded copy). Run B resumes A's
step-2 folder on 2 ranks: its step-4 checkpoint is bit-identical to A's (model, optimizer, RNG and data
records). Run C resumes the same folder on 1 rank: model and optimizer are resharded (checked here, in this
process without a process group, against the gathered folder) and training continues.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import run_torchrun
from vlp_core.train.checkpoint import COMPLETE, CheckpointManager, is_dcp_checkpoint, load_full_state

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "train_worker.py"


def args(world: Path, out: Path, steps: int, *extra: str, evaluate: bool = False) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", "train.progress=false", "--workers", "1", "--steps", str(steps), "--set", "train.save_every=2",
            "--set", f"eval.at_end={evaluate}", "--set", "data.augment=true", "--set", "train.parallel=fsdp",
            "--set", "train.accum_steps=2", *extra]  # FSDP's reduce-scatter skipped on the first micro-batch


def assert_same(a: object, b: object, where: str) -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, sorted(set(a) ^ set(b)))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__array__"):
        assert (a == b).all(), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def run_a(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dcp") / "a"
    run_torchrun(WORKER, 2, *args(tiny_world, out, 4, "--set", "train.async_save=true", evaluate=True), timeout=240)
    return out


def test_fsdp_run_writes_finished_dcp_folders_and_evaluates(run_a: Path) -> None:
    ckpts = CheckpointManager(run_a / "checkpoints")
    assert [s for s, _ in ckpts.list()] == [2, 4]
    latest = ckpts.latest()
    assert latest is not None and latest.name == "step_00000004" and is_dcp_checkpoint(latest)
    commit = json.loads((latest / COMPLETE).read_text())  # the commit record: every file with its size
    assert commit["world_size"] == 2 and commit["step"] == 4
    assert {"meta.pt", "ranks/rank_00000.pt", "ranks/rank_00001.pt", ".metadata"} <= set(commit["files"])
    CheckpointManager.verify(latest)
    assert sorted(p.name for p in (latest / "ranks").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert len(list(latest.glob("*.distcp"))) == 2  # each rank wrote its own shards
    assert not list((run_a / "checkpoints").glob("*.tmp"))
    full = load_full_state(latest)
    assert full["step"] == 4 and len(full["ranks"]) == 2 and full["config"]["train"]["parallel"] == "fsdp"
    assert full["model"]["loss.loss.logit_scale"].ndim == 0  # the replicated scalar, stored once
    assert all(isinstance(v, torch.Tensor) for v in full["model"].values())
    # the optimizer state is keyed by parameter name, for every trainable parameter
    assert set(full["optimizer"]["state"]) <= set(full["model"]) and len(full["optimizer"]["state"]) > 30
    # the per-rank sample counts add up to the global sample count
    assert sum(r["samples"] for r in full["ranks"]) == 4 * full["config"]["train"]["batch_size"]
    evals = [json.loads(line) for line in (run_a / "eval.jsonl").read_text().splitlines()]
    assert len(evals) == 1 and evals[0]["step"] == 4 and "retrieval/i2t_R@1" in evals[0]
    # CheckpointManager.load reads a DCP folder like a file; an unfinished folder is neither listed nor read
    assert CheckpointManager.load(latest)["step"] == 4
    broken = run_a / "checkpoints" / "step_00000009"
    shutil.copytree(latest, broken)
    (broken / COMPLETE).unlink()
    assert ckpts.latest() == latest
    with pytest.raises(ValueError, match="unfinished DCP checkpoint"):
        load_full_state(broken)
    shutil.rmtree(broken)


def test_two_rank_resume_is_bit_identical(run_a: Path, tiny_world: Path, tmp_path: Path) -> None:
    mid = CheckpointManager(run_a / "checkpoints").list()[0][1]
    out = tmp_path / "b"
    r = run_torchrun(WORKER, 2, *args(tiny_world, out, 4, "--resume", str(mid)), timeout=240)
    assert f"resumed from {mid} at step 2" in r.stderr
    a = load_full_state(run_a / "checkpoints" / "step_00000004")
    b = load_full_state(out / "checkpoints" / "step_00000004")
    for key in ("step", "model", "optimizer", "scheduler", "ranks"):
        assert_same(a[key], b[key], key)


def test_one_rank_resume_reshards_model_and_optimizer(run_a: Path, tiny_world: Path, tmp_path: Path) -> None:
    mid = CheckpointManager(run_a / "checkpoints").list()[0][1]
    saved = load_full_state(mid)

    # Resharded into one process's plain module and optimizer (no process group: DCP reads every shard).
    from vlp_core.clip import METHOD
    from vlp_core.config import from_dict
    from vlp_core.data.tokenizer import Tokenizer
    from vlp_core.train.loop import TrainStep
    from vlp_core.train.optim import build_optimizer
    from vlp_core.train.parallel import split_scalar_groups

    cfg = METHOD.preset("smoke")
    from_dict(cfg, saved["config"])
    tok = Tokenizer.from_pretrained(str(tiny_world / "tokenizer.json"), context_length=cfg.model.text.context_length)
    module = TrainStep(METHOD.build_model(cfg, tok), METHOD.build_loss(cfg))
    optimizer = build_optimizer(module, cfg.optim, device=torch.device("cpu"))
    split_scalar_groups(optimizer)
    shared, records = CheckpointManager.load_dcp(mid, module, optimizer)
    assert shared["step"] == 2 and len(records) == 2
    assert_same(module.state_dict(), saved["model"], "model")
    names = {id(p): n for n, p in module.named_parameters()}
    for p, st in optimizer.state.items():
        assert_same({k: v for k, v in st.items()}, saved["optimizer"]["state"][names[id(p)]], names[id(p)])
    assert len(optimizer.state) == len(saved["optimizer"]["state"])

    # The trainer on one rank resumes it (same step and global sample count) and trains on.
    out = tmp_path / "c"
    r = run_torchrun(WORKER, 1, *args(tiny_world, out, 3, "--resume", str(mid)), timeout=240)
    assert "written by 2 ranks) on 1 ranks" in r.stderr and f"resumed from {mid} at step 2" in r.stderr
    c = load_full_state(CheckpointManager(out / "checkpoints").latest())
    assert c["step"] == 3 and len(c["ranks"]) == 1
    assert c["ranks"][0]["samples"] == 3 * cfg.train.batch_size  # the global sample count carried over
    assert any(not torch.equal(c["model"][k], v) for k, v in saved["model"].items())
