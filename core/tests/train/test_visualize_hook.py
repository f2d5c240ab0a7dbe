"""``MethodSpec.visualize``: the trainer writes a method's own images to TensorBoard at image-grid steps,
in eval mode and without gradients, and training is unchanged by it."""

import dataclasses

import numpy as np
import torch

from vlp_core.clip import METHOD as CLIP
from vlp_core.train.checkpoint import CheckpointManager
from vlp_core.train.loop import run

calls: list[dict] = []


def visualize(model, loss, batch):
    calls.append({"training": model.training, "grad": torch.is_grad_enabled(),
                  "device_images": batch["images"].dtype == torch.float32})
    feats = model.encode_image(batch["images"][:2])
    # A real picture of something the model computed: its first image feature as a grey strip.
    strip = feats[0].detach().float()
    strip = ((strip - strip.min()) / (strip.max() - strip.min() + 1e-6) * 255).to(torch.uint8)
    return {"method/feature_strip": np.repeat(strip.numpy()[None, :, None], 8, axis=0).repeat(3, axis=2)}


METHOD = dataclasses.replace(CLIP, name="withimages", visualize=visualize)


def _cfg(world, out, method=METHOD):
    cfg = method.preset("smoke")
    cfg.data.world_dir, cfg.train.output_dir = str(world), str(out)
    cfg.train.steps, cfg.train.image_grid_every, cfg.train.progress, cfg.eval.at_end = 4, 2, False, False
    cfg.data.workers = 0
    return cfg


def test_visualize_images_reach_tensorboard(tiny_world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    calls.clear()
    run(_cfg(tiny_world, tmp_path / "vis"), METHOD)
    assert len(calls) == 2  # steps 0 and 2
    assert all(not c["training"] and not c["grad"] and c["device_images"] for c in calls)
    acc = EventAccumulator(str(tmp_path / "vis" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "method/feature_strip" in acc.Tags()["images"]
    assert [e.step for e in acc.Images("method/feature_strip")] == [0, 2]

    # The hook changes nothing about training: same final parameters as the plain baseline.
    run(_cfg(tiny_world, tmp_path / "plain", CLIP), CLIP)
    a = CheckpointManager.load(CheckpointManager(tmp_path / "vis" / "checkpoints").latest())["model"]
    b = CheckpointManager.load(CheckpointManager(tmp_path / "plain" / "checkpoints").latest())["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
