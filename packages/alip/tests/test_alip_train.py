"""The trainer end to end with ALIP: a run cut short after a checkpoint resumes with the running averages H
restored exactly; the gate weights reach metrics.jsonl and TensorBoard."""

import json
import shutil

import torch
from vlp_alip import METHOD, AlipLoss

from vlp_core.train.checkpoint import CheckpointManager
from vlp_core.train.loop import run

H_KEYS = ("loss.h_tc", "loss.h_xt", "loss.h_xc")


def _cfg(world, out, resume=""):
    cfg = METHOD.preset("smoke")
    cfg.data.world_dir, cfg.train.output_dir, cfg.train.resume = str(world), str(out), resume
    cfg.train.steps, cfg.train.save_every, cfg.train.progress, cfg.eval.at_end = 4, 2, False, False
    cfg.data.workers = 1
    return cfg


def _ckpts(out):
    manager = CheckpointManager(out / "checkpoints")
    return {step: CheckpointManager.load(path)["model"] for step, path in manager.list()}


def test_resume_restores_running_averages_exactly(noisy_world, tmp_path, monkeypatch):
    run(_cfg(noisy_world, tmp_path / "whole"), METHOD)
    whole = _ckpts(tmp_path / "whole")
    assert sorted(whole) == [2, 4]
    at2 = whole[2]
    assert all(0 < float(at2[k]) < 1 for k in H_KEYS)  # H moved away from its start value 1.0

    # What a run killed after step 2 leaves behind: its folder with the step-2 checkpoint only.
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    src = dict(CheckpointManager(tmp_path / "whole" / "checkpoints").list())[2]
    shutil.copy(src, part / "checkpoints" / src.name)
    shutil.copy(f"{src}.commit", part / "checkpoints" / f"{src.name}.commit")  # its commit record: complete
    seen = {}
    original = AlipLoss.forward

    def spy(self, features, batch):  # H as the first resumed step finds it
        seen.setdefault("start", tuple(getattr(self, k.split(".")[1]).clone() for k in H_KEYS))
        return original(self, features, batch)

    monkeypatch.setattr(AlipLoss, "forward", spy)
    run(_cfg(noisy_world, part, resume="latest"), METHOD)
    assert all(torch.equal(h, at2[k]) for h, k in zip(seen["start"], H_KEYS))
    resumed = _ckpts(part)[4]
    assert resumed.keys() == whole[4].keys() and set(H_KEYS) <= resumed.keys()
    for k in resumed:  # parameters and H bit-identical to the uninterrupted run
        assert torch.equal(resumed[k], whole[4][k]), k
    assert all(not torch.equal(whole[4][k], at2[k]) for k in H_KEYS)  # H kept moving after step 2

    # metrics: H and the mean gate weights at every log step (smoke logs every step)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("gate_ws_mean", "gate_wt_mean", "gate_wc_mean", "H_tc", "H_xt", "H_xc", "gate_ws_noisy"):
        assert all(f"train/{key}" in r for r in rows), key
    assert all(0 < r["train/gate_ws_mean"] <= 1 for r in rows)
    h = [r["train/H_tc"] for r in rows]
    assert all(x > y for x, y in zip(h, h[1:]))  # from H0 = 1 towards the (lower) batch means
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "whole" / "tensorboard"))
    acc.Reload()
    assert {"train/gate_ws_mean", "train/gate_wt_mean", "train/gate_wc_mean", "train/H_tc"} <= set(
        acc.Tags()["scalars"])
    assert len(acc.Scalars("train/gate_ws_mean")) == 4


def test_bad_config_value_is_a_clear_error(capsys):
    from vlp_alip.cli import train_main

    assert train_main(["--set", "loss.momentum=1.5", "--print-config"]) == 2
    assert "loss.momentum must be in [0, 1)" in capsys.readouterr().err
    assert train_main(["--set", "loss.gamma=2", "--print-config"]) == 2
    assert "did you mean" in capsys.readouterr().err
