"""The trainer end to end through the CLI: exact resume after a kill, bad data, TensorBoard contents."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from vlp_core.data.tario import ShardWriter, iter_samples
from vlp_core.train.checkpoint import CheckpointManager

TRAIN = "from vlp_core.clip.cli import train_main; raise SystemExit(train_main())"


def clip_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", TRAIN, *args], capture_output=True, text=True, env=full_env,
                          timeout=300)


def smoke_args(world: Path, out: Path, *extra: str, evaluate: bool = False) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", f"model.text.tokenizer={world}/tokenizer.json",
            "--set", f"eval.at_end={evaluate}", "--set", "train.progress=false", *extra]


def final_params(run: Path) -> dict[str, torch.Tensor]:
    path = CheckpointManager(run / "checkpoints").latest()
    assert path is not None
    return CheckpointManager.load(path)["model"]


def test_killed_run_resumes_exactly(tiny_world, tmp_path):
    common = ["--steps", "6", "--set", "train.save_every=3", "--workers", "2", "--set", "data.augment=true"]
    whole = clip_train(*smoke_args(tiny_world, tmp_path / "whole", *common))
    assert whole.returncode == 0, whole.stderr
    killed = clip_train(*smoke_args(tiny_world, tmp_path / "killed", *common),
                        env={"VLP_DEBUG_KILL_AT_STEP": "3"})
    assert killed.returncode != 0  # SIGKILL after the step-3 checkpoint
    assert [s for s, _ in CheckpointManager(tmp_path / "killed" / "checkpoints").list()] == [3]
    resumed = clip_train(*smoke_args(tiny_world, tmp_path / "killed", *common, "--resume", "latest"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and the run is not trivially constant: parameters moved from their initial values
    other = clip_train(*smoke_args(tiny_world, tmp_path / "short", "--steps", "6", "--set", "train.save_every=3",
                                   "--workers", "2", "--seed", "1"))
    assert other.returncode == 0, other.stderr
    c = final_params(tmp_path / "short")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_samples_are_skipped_and_counted(tiny_world, tmp_path):
    good = list(iter_samples(str(tiny_world / "train" / "00000.tar")))[:40]
    with ShardWriter(str(tmp_path / "shards" / "%05d.tar"), max_count=1000) as w:
        for i, s in enumerate(good):
            sample = {"__key__": f"k{i:04d}", "jpg": s["jpg"], "txt": s["txt"]}
            if i == 3:
                sample["jpg"] = b"this is not a jpeg"
            if i == 5:
                sample["txt"] = "   "
            w.write(sample)
    with ShardWriter(str(tmp_path / "shards" / "%05d.tar").replace("%05d", "1%04d"), max_count=1000) as w:
        for i, s in enumerate(good[:10]):
            w.write({"__key__": f"t{i:04d}", "jpg": s["jpg"], "txt": s["txt"]})
    truncated = tmp_path / "shards" / "10000.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])  # cut inside a member
    pattern = f"{tmp_path}/shards/{{00000,10000}}.tar"
    r = clip_train(*smoke_args(tiny_world, tmp_path / "run", "--train-data", pattern, "--steps", "8",
                               "--workers", "0", "--set", "loss.caption_keys=txt"))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["data/skipped_bad_image"] >= 1
    assert last["data/skipped_empty_caption"] >= 1
    assert last["data/skipped_corrupt_shard"] >= 1
    assert "skipped sample" in r.stderr and "not a" not in r.stdout
    assert "00000.tar:k0003" in r.stderr  # the log names the file and the key


def test_missing_data_is_a_one_line_error(tiny_world, tmp_path):
    r = clip_train(*smoke_args(tiny_world, tmp_path / "run", "--train-data", str(tmp_path / "nope-{0..3}.tar")))
    assert r.returncode == 2
    assert "shard not found" in r.stderr and "Traceback" not in r.stderr
    r = clip_train(*smoke_args(tiny_world, tmp_path / "run2", "--set", "optim.lrr=1"))
    assert r.returncode == 2 and "did you mean 'lr'" in r.stderr and "Traceback" not in r.stderr


def test_tensorboard_holds_scalars_and_image_grid(tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = clip_train(*smoke_args(tiny_world, tmp_path / "run", "--steps", "4", "--set", "train.image_grid_every=2",
                               evaluate=True))
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/loss_contrastive", "train/lr", "train/logit_scale", "train/samples_per_s",
                "train/data_wait_frac", "train/grad_norm", "eval/zeroshot_color_shape/top1",
                "eval/retrieval/i2t_R@1", "eval/compositional/accuracy"]:
        assert tag in scalars, (tag, sorted(scalars))
    assert "train/samples" in acc.Tags()["images"]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert len(lrs) == 4 and lrs[0] != lrs[-1]
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_periodic_linear_probe_equals_the_standalone_probe(tiny_world, tmp_path):
    """``eval.linear_probe`` logs, at each evaluation, what ``python -m vlp_core.eval.linear_probe`` gives on
    that step's checkpoint (same tower, features, split and fit)."""
    from vlp_core.eval.linear_probe import main as probe_main

    run = tmp_path / "run"
    done = clip_train(*smoke_args(tiny_world, run, "--steps", "4", "--set", "train.save_every=2",
                                  "--set", "train.eval_every=2", "--set", "train.keep_checkpoints=5",
                                  "--set", "eval.linear_probe=zeroshot_shape,zeroshot_color", evaluate=True))
    assert done.returncode == 0, done.stderr
    evals = {r["step"]: r for r in map(json.loads, (run / "eval.jsonl").read_text().splitlines())}
    assert sorted(evals) == [2, 4]
    for step, record in evals.items():
        ckpt = dict(CheckpointManager(run / "checkpoints").list())[step]
        out = tmp_path / f"probe{step}.json"
        assert probe_main([str(ckpt), "--method", "clip", "--sets", "zeroshot_shape,zeroshot_color",
                           "--output", str(out)]) == 0
        standalone = json.loads(out.read_text())
        assert {k: v for k, v in record.items() if "/probe_" in k} == standalone
        assert 0 <= record["zeroshot_color/probe_top1"] <= 100 and record["zeroshot_shape/probe_n_test"] > 0
