"""A method plugged in through MethodSpec alone: its loss keeps state (a running average, like ALIP's gates)
that is checkpointed and restored exactly on resume."""

import dataclasses

import torch
from torch import nn

from vlp_core.clip import METHOD as CLIP
from vlp_core.clip import ContrastiveObjective
from vlp_core.method import LossOutput
from vlp_core.train.checkpoint import CheckpointManager
from vlp_core.train.loop import run


class RunningMeanLoss(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.inner = ContrastiveObjective(cfg.loss)
        self.register_buffer("running_sim", torch.tensor(0.5))
        self.register_buffer("updates", torch.tensor(0))

    def forward(self, features, batch) -> LossOutput:
        out = self.inner(features, batch)
        with torch.no_grad():
            img = nn.functional.normalize(features["image_features"], dim=-1)
            txt = nn.functional.normalize(features["text_features"], dim=-1)
            self.running_sim.mul_(0.9).add_(0.1 * (img * txt).sum(-1).mean())
            self.updates.add_(1)
        return LossOutput(out.loss, {**out.parts, "running_sim": self.running_sim.clone()})


METHOD = dataclasses.replace(CLIP, name="stateful", build_loss=lambda cfg: RunningMeanLoss(cfg))


def _cfg(world, out, resume=""):
    cfg = METHOD.preset("smoke")
    cfg.data.world_dir, cfg.train.output_dir, cfg.train.resume = str(world), str(out), resume
    cfg.train.steps, cfg.train.save_every, cfg.train.progress, cfg.eval.at_end = 4, 2, False, False
    cfg.data.workers = 0
    return cfg


def test_loss_state_is_checkpointed_and_restored(tiny_world, tmp_path, monkeypatch):
    run(_cfg(tiny_world, tmp_path / "whole"), METHOD)
    whole = CheckpointManager.load(CheckpointManager(tmp_path / "whole" / "checkpoints").latest())["model"]
    assert whole["loss.updates"].item() == 4 and whole["loss.running_sim"].item() != 0.5

    cfg = _cfg(tiny_world, tmp_path / "part")
    cfg.train.steps = 2  # a shorter run: the checkpoint at step 2 is what a killed run leaves
    run(cfg, METHOD)
    part = CheckpointManager.load(CheckpointManager(tmp_path / "part" / "checkpoints").latest())
    assert part["model"]["loss.updates"].item() == 2
    # continue to 4 steps; the schedule of a 2-step run differs, so compare the state alone, not weights
    resumed_cfg = _cfg(tiny_world, tmp_path / "part", resume="latest")
    state = {}
    original = RunningMeanLoss.forward

    def spy(self, features, batch):
        if "start" not in state:
            state["start"] = (self.running_sim.item(), self.updates.item())
        return original(self, features, batch)

    monkeypatch.setattr(RunningMeanLoss, "forward", spy)
    run(resumed_cfg, METHOD)
    assert state["start"] == (part["model"]["loss.running_sim"].item(), 2)
