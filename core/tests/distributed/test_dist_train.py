"""``clip-train --preset smoke`` on 2 gloo ranks (CPU): run folder, sharded final eval, exact resume.

Every run launches workers/train_worker.py (the CLI on each rank) through ``run_torchrun`` on the tiny shapes
world. The 6-step run is shared: it is checked on its own, against a single-process ``clip-eval`` of its
final checkpoint, and as the reference for a run killed after step 3 and resumed with ``--resume latest``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from vlp_core.testing.dist import run_torchrun
from vlp_core.train.checkpoint import CheckpointManager

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "workers" / "train_worker.py"
STEPS, SAVE_EVERY = 6, 3


def train_args(world: Path, out: Path, *extra: str, evaluate: bool = False) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", "train.progress=false", "--workers", "1", "--steps", str(STEPS),
            "--set", f"train.save_every={SAVE_EVERY}", "--set", f"eval.at_end={evaluate}",
            # random crops (seeded per sample): the augmentation must resume exactly too
            "--set", "data.augment=true", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_jsonl(run / "metrics.jsonl") if "train/loss" in r]


def final_params(run: Path) -> dict[str, torch.Tensor]:
    path = CheckpointManager(run / "checkpoints").latest()
    assert path is not None
    saved = CheckpointManager.load(path)
    assert saved["step"] == STEPS
    return saved["model"]


def single_process_eval(run: Path, out: Path) -> int:
    """``clip-eval RUN --output OUT`` in this process (saves a second interpreter start); restores logging."""
    from vlp_core.clip.cli import eval_main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return eval_main([str(run), "--output", str(out)])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(scope="module")
def whole_run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The uninterrupted 2-rank run, with the final evaluation; returns (run folder, stdout)."""
    out = tmp_path_factory.mktemp("dist_train") / "whole"
    r = run_torchrun(WORKER, 2, *train_args(tiny_world, out, evaluate=True), timeout=240)
    return out, r.stdout


def test_two_rank_run_writes_one_run_folder_and_sharded_eval(whole_run: tuple[Path, str],
                                                             tmp_path: Path) -> None:
    run, stdout = whole_run
    assert (run / "config.yaml").is_file()
    files = sorted(p.name for p in run.iterdir() if p.is_file())
    assert files == ["config.yaml", "eval.jsonl", "metrics.jsonl"]
    assert "world_dir" in (run / "config.yaml").read_text()

    # log_every=1: one train row per step, written by rank 0 only; then the final eval's row
    rows = read_jsonl(run / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in train_rows)
    assert [r["step"] for r in rows if "eval/compositional/accuracy" in r] == [STEPS]

    ckpts = CheckpointManager(run / "checkpoints").list()
    assert [s for s, _ in ckpts] == [SAVE_EVERY, STEPS]
    assert not list((run / "checkpoints").glob("*.tmp"))
    saved = CheckpointManager.load(ckpts[-1][1])
    assert saved["step"] == STEPS and len(saved["ranks"]) == 2
    # one entry per rank: its data position and its own RNG stream (seeded with seed + rank)
    assert all(set(r) >= {"rng", "data", "batches"} for r in saved["ranks"])
    assert not torch.equal(saved["ranks"][0]["rng"]["torch"], saved["ranks"][1]["rng"]["torch"])

    evals = read_jsonl(run / "eval.jsonl")
    assert len(evals) == 1 and evals[0]["step"] == STEPS
    sharded = {k: v for k, v in evals[0].items() if k != "step"}
    for key in ("zeroshot_shape/top1", "zeroshot_color_shape/top1", "retrieval/i2t_R@1",
                "compositional/accuracy"):
        assert key in sharded, sorted(sharded)
    # Counts show that the two shards together covered every item once (tiny world: see conftest.TINY_EVAL).
    assert sharded["zeroshot_shape/n"] == 60 and sharded["retrieval/n_images"] == 50
    assert sharded["compositional/n"] == 40
    assert json.loads(stdout[stdout.index("{"):stdout.index("}") + 1]) == sharded  # the CLI prints them

    # The same final checkpoint evaluated by one process (this one, no process group): identical numbers.
    out = tmp_path / "eval.json"
    assert single_process_eval(run, out) == 0
    single = json.loads(out.read_text())
    assert single == sharded


def test_killed_two_rank_run_resumes_exactly(whole_run: tuple[Path, str], tiny_world: Path,
                                             tmp_path: Path) -> None:
    whole, _ = whole_run
    run = tmp_path / "killed"
    # Rank 0 SIGKILLs itself right after writing the step-3 checkpoint; the launcher then stops rank 1.
    # (Only rank 0 gets the kill hook: see the worker's docstring for the race when every rank dies.)
    killed = run_torchrun(WORKER, 2, *train_args(tiny_world, run), timeout=240, check=False,
                          env={"VLP_DEBUG_KILL_AT_STEP": str(SAVE_EVERY)})
    assert killed.returncode != 0
    saved = [s for s, _ in CheckpointManager(run / "checkpoints").list()]
    assert saved == [SAVE_EVERY], killed.stderr[-3000:]
    assert [s for s, _ in train_losses(run)] == list(range(1, SAVE_EVERY + 1))

    resumed = run_torchrun(WORKER, 2, *train_args(tiny_world, run, "--resume", "latest"), timeout=240)
    assert f"resumed from {run / 'checkpoints'}" in resumed.stderr
    assert [s for s, _ in CheckpointManager(run / "checkpoints").list()] == [SAVE_EVERY, STEPS]

    a, b = final_params(whole), final_params(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # Per-step losses (rank 0's) agree too: the resumed ranks read exactly the batches the whole run read.
    assert train_losses(run) == train_losses(whole)
    # and training did move the parameters between the checkpoint and the end
    mid = CheckpointManager.load(CheckpointManager(run / "checkpoints").list()[0][1])["model"]
    assert any(not torch.equal(mid[k], b[k]) for k in b)
