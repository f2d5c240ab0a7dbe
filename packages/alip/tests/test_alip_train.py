"""alip-train end to end: a killed run resumes with the running averages H restored exactly; the gate
weights reach metrics.jsonl and TensorBoard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vlp_core.train.checkpoint import CheckpointManager

TRAIN = "from vlp_alip.cli import train_main; raise SystemExit(train_main())"
H_KEYS = ("loss.h_tc", "loss.h_xt", "loss.h_xc")


def alip_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", TRAIN, *args], capture_output=True, text=True, env=full_env,
                          timeout=300)


def smoke_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", "eval.at_end=false", "--set", "train.progress=false", "--steps", "4",
            "--set", "train.save_every=2", "--workers", "1", *extra]


def checkpoint(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    manager = CheckpointManager(run / "checkpoints")
    path = manager.latest() if step is None else dict(manager.list())[step]
    return CheckpointManager.load(path)["model"]


def test_killed_run_resumes_with_running_averages_restored(noisy_world, tmp_path):
    whole = alip_train(*smoke_args(noisy_world, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    killed = alip_train(*smoke_args(noisy_world, tmp_path / "killed"), env={"VLP_DEBUG_KILL_AT_STEP": "2"})
    assert killed.returncode != 0  # SIGKILL right after the step-2 checkpoint
    at2 = checkpoint(tmp_path / "killed")
    assert all(0 < float(at2[k]) < 1 for k in H_KEYS)  # H moved away from its start value 1.0
    resumed = alip_train(*smoke_args(noisy_world, tmp_path / "killed", "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "killed")
    assert a.keys() == b.keys() and set(H_KEYS) <= a.keys()
    for k in a:  # parameters and H buffers bit-identical to the uninterrupted run
        assert torch.equal(a[k], b[k]), k
    for k in H_KEYS:  # and H kept moving after the resume, from the restored value
        assert torch.equal(checkpoint(tmp_path / "whole", 2)[k], at2[k]) and not torch.equal(a[k], at2[k])

    # metrics: H and the mean gate weights at every log step (smoke logs every step)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 5))
    for key in ("gate_ws_mean", "gate_wt_mean", "gate_wc_mean", "H_tc", "H_xt", "H_xc", "gate_ws_noisy"):
        assert all(f"train/{key}" in r for r in rows), key
    assert all(0 < r["train/gate_ws_mean"] <= 1 for r in rows)
    h = [r["train/H_tc"] for r in rows]
    assert all(x > y for x, y in zip(h, h[1:]))  # from H0 = 1 towards the (lower) batch means
    # TensorBoard holds the same tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "whole" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/gate_ws_mean", "train/gate_wt_mean", "train/gate_wc_mean", "train/H_tc"} <= tags
    assert len(acc.Scalars("train/gate_ws_mean")) == 4


def test_bad_config_value_is_a_clear_error(capsys):
    from vlp_alip.cli import train_main

    assert train_main(["--set", "loss.momentum=1.5", "--print-config"]) == 2
    assert "loss.momentum must be in [0, 1)" in capsys.readouterr().err
    assert train_main(["--set", "loss.gamma=2", "--print-config"]) == 2
    assert "did you mean" in capsys.readouterr().err
