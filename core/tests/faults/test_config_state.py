"""Config and state faults: bad intervals fail validation in one line, a resume with other data settings warns
or stops (train.strict_resume), and a temperature pushed past its cap by the optimizer is clamped back."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from vlp_core.cli import train_main
from vlp_core.clip import METHOD
from vlp_core.config import RunConfig
from vlp_core.data.tario import iter_samples
from vlp_core.losses import bounded_scalars
from vlp_core.testing.bounds import bounded_names, push_past_bound
from vlp_core.train.checkpoint import CheckpointManager
from vlp_core.train.loop import TrainStep, _optimizer_step, _to_device
from vlp_core.train.optim import build_optimizer
from vlp_core.train.parallel import split_scalar_groups
from vlp_core.train.resume_check import data_differences
from vlp_core.train.setup import load_tokenizer

pytestmark = pytest.mark.faults

CAP = math.log(100.0)


@pytest.fixture(autouse=True)
def _drop_cli_log_handler():
    """train_main installs a root handler on the (captured) stderr: remove it so no later test writes to it."""
    import logging

    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_vlp_rank_handler", False):
            root.removeHandler(h)


# ---------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(("key", "value"), [
    ("train.save_every", 0), ("train.log_every", 0), ("train.save_every", -5), ("train.log_every", -1),
    ("train.eval_every", -1), ("train.image_grid_every", -1), ("train.keep_checkpoints", -1),
    ("train.nan_guard", -1), ("train.dist_timeout_s", 0.0), ("train.dist_timeout_s", float("inf")),
    ("train.accum_steps", 0), ("data.workers", -1), ("data.shuffle_buffer", -1), ("data.max_image_pixels", -1),
    ("data.max_shard_failures", 0), ("data.world_noise", 1.5), ("optim.lr", float("nan")), ("optim.eps", 0.0),
    ("optim.beta2", 1.0), ("optim.warmup_steps", -1), ("model.vision.patch_size", 0), ("model.text.heads", 0),
    ("eval.batch_size", 0), ("loss.max_logit_scale", 0.5),
])
def test_bad_values_fail_validation_in_one_line(key: str, value: float) -> None:
    cfg = METHOD.preset("smoke")
    node = cfg
    *parents, leaf = key.split(".")
    for part in parents:
        node = getattr(node, part)
    setattr(node, leaf, value)
    with pytest.raises(ValueError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "\n" not in msg and key in msg and repr(value) in msg, msg


def test_zero_as_off_and_presets_stay_valid() -> None:
    cfg = METHOD.preset("smoke")
    t = cfg.train
    t.eval_every, t.image_grid_every, t.keep_checkpoints, t.nan_guard = 0, 0, 0, 0
    cfg.data.workers, cfg.data.shuffle_buffer, cfg.data.max_image_pixels = 0, 0, 0
    cfg.validate()  # 0 means "off" (or "keep all", "PIL's limit") for these
    for name in METHOD.presets:
        METHOD.preset(name).validate()
    RunConfig().validate()


def test_save_every_zero_through_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    """The ``clip-train`` console script's function: exit status 2 and exactly one stderr line naming the key
    and value, before any work (no run folder)."""
    from vlp_core.clip.cli import train_main as clip_train

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["clip-train", "--preset", "smoke", "--set", "train.save_every=0",
                                      "--output-dir", str(out)])
    assert clip_train() == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["clip-train: error: train.save_every must be > 0 (steps between checkpoints), got 0"], err
    assert not out.exists()
    assert train_main(METHOD, ["--preset", "smoke", "--set", "train.log_every=0", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["clip-train: error: train.log_every must be > 0 (steps between log lines), got 0"], err


# ---------------------------------------------------------------------------------------------------------
# strict_resume


def test_data_differences_normalise_equivalent_settings() -> None:
    from vlp_core.config import to_dict

    cfg = METHOD.preset("smoke")
    saved = to_dict(cfg)
    assert data_differences(saved, cfg) == []
    cfg.data.workers, cfg.data.shuffle_buffer = 0, 16  # workers 0 and 1: one consumer per rank either way
    saved["data"]["workers"] = 1
    cfg.train.accum_steps = 2  # the rank reads its whole batch: the samples of a step do not change
    assert data_differences(saved, cfg, saved_world=2, world=2) == []
    cfg.data.seed, cfg.train.batch_size, cfg.data.world_seed = 3, 32, 1
    assert data_differences(saved, cfg, saved_world=2, world=1) == [
        ("data.seed", 0, 3), ("data.world_seed", 0, 1), ("train.batch_size", 16, 32), ("world_size", 2, 1)]
    cfg.data.train_data = "shards/{0..3}.tar"  # real shards: the shapes world's settings no longer matter
    saved["data"]["train_data"] = "shards/{0..3}.tar"
    assert [k for k, _, _ in data_differences(saved, cfg)] == ["data.seed", "train.batch_size"]
    del saved["data"]["seed"]  # an older checkpoint without the key: not compared
    assert [k for k, _, _ in data_differences(saved, cfg)] == ["train.batch_size"]
    assert data_differences({}, cfg) == [] and data_differences(None, cfg) == []


def _args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["--preset", "smoke", "--set", f"data.world_dir={world}", "--output-dir", str(out),
            "--set", f"model.text.tokenizer={world}/tokenizer.json", "--set", "data.world_train_samples=400",
            "--set", "eval.at_end=false", "--set", "train.progress=false", "--workers", "0", *extra]


def test_resume_with_another_data_seed_warns_or_stops(tiny_world: Path, tmp_path: Path, caplog, capsys) -> None:
    """A 2-step run (its temperature initialised past the cap: the trainer's after_step clamps the stored value),
    resumed with another data.seed: strict stops in one line, the default warns and keeps the sample count."""
    out = tmp_path / "run"
    # T = 0.001: logit scale ln 1000, past the cap ln 100 (zero gradient there: it never comes back by itself).
    first = _args(tiny_world, out, "--steps", "2", "--set", "train.save_every=2", "--set",
                  "loss.init_temperature=0.001")
    assert train_main(METHOD, first) == 0
    ckpts = CheckpointManager(out / "checkpoints")
    assert [s for s, _ in ckpts.list()] == [2]
    scale = float(CheckpointManager.load(ckpts.latest())["model"]["loss.loss.logit_scale"])
    assert CAP - 0.05 < scale <= CAP + 1e-6, scale  # clamped after step 1, learnable (not stuck) after
    capsys.readouterr()

    resume = _args(tiny_world, out, "--steps", "4", "--set", "train.save_every=2", "--resume", "latest",
                   "--set", "data.seed=1")
    assert train_main(METHOD, [*resume, "--set", "train.strict_resume=true"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("clip-train: error: train.strict_resume:"), errors
    assert "data.seed 0 -> 1" in errors[0] and "Traceback" not in errors[0]
    assert [s for s, _ in ckpts.list()] == [2]  # stopped before any step

    caplog.clear()
    with caplog.at_level("WARNING", logger="vlp"):
        assert train_main(METHOD, resume) == 0
    warned = [r.getMessage() for r in caplog.records if "differ from the checkpoint" in r.getMessage()]
    assert len(warned) == 1 and "data.seed 0 -> 1" in warned[0] and "data order will differ" in warned[0], warned
    assert [s for s, _ in ckpts.list()] == [2, 4]
    saved = CheckpointManager.load(ckpts.latest())
    assert saved["ranks"][0]["samples"] == 4 * 16  # the global sample count went on


# ---------------------------------------------------------------------------------------------------------
# temperature bounds through the optimizer


@pytest.fixture(scope="module")
def clip_batch(tiny_world: Path):
    cfg = METHOD.preset("smoke")
    cfg.data.world_dir = str(tiny_world)
    tok = load_tokenizer(cfg, tiny_world)
    adapter = METHOD.build_adapter(cfg, tok)
    samples = [adapter(s) for s in list(iter_samples(str(tiny_world / "train" / "00000.tar")))[:8]]
    return cfg, tok, _to_device(adapter.collate(samples), torch.device("cpu"))


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
@pytest.mark.parametrize("upper", [True, False])
def test_logit_scale_pushed_past_a_bound_comes_back_and_learns_again(clip_batch, kind: str, upper: bool) -> None:
    """The trainer's step (forward, backward, _optimizer_step, after_step) with lr 1 carries the scale 0.9 past
    the cap (or below 0); after_step clamps it onto the bound, where the next step's gradient is nonzero."""
    cfg, tok, batch = clip_batch
    cfg.loss.kind = kind
    cfg.optim.lr, cfg.optim.weight_decay = 1.0, 0.0
    torch.manual_seed(0)
    module = TrainStep(METHOD.build_model(cfg, tok), METHOD.build_loss(cfg))
    assert bounded_names(module.loss) == {"loss.logit_scale"}  # SigLIP's bias is unbounded
    ((_, scale, lower, high),) = bounded_scalars(module.loss)
    assert (lower, high) == (0.0, CAP)
    optimizer = build_optimizer(module, cfg.optim, device=torch.device("cpu"))
    split_scalar_groups(optimizer)
    bound = CAP if upper else 0.0
    with torch.no_grad():
        scale.fill_(bound - 0.1 if upper else bound + 0.1)
    nonfinite = torch.zeros(())
    for step in range(2):
        optimizer.zero_grad(set_to_none=True)
        out = module(batch)
        out.loss.backward()
        assert scale.grad is not None and scale.grad.item() != 0.0  # inside the bounds or on one: it learns
        if step == 0:
            scale.grad.fill_(-1.0 if upper else 1.0)  # a push out of the bounds (AdamW's first step: lr * sign)
        skipped = _optimizer_step(module, optimizer, None, 0.0, nonfinite, {"loss": out.loss.detach()})
        if step == 0:
            assert (scale.item() > CAP + 0.5) if upper else (scale.item() < -0.5)  # the optimizer pushed it out
        module.loss.after_step(~skipped)
        if step == 0:
            assert scale.item() == pytest.approx(bound, abs=1e-6)
        assert 0.0 <= scale.item() <= CAP + 1e-6


@pytest.mark.parametrize("upper", [True, False])
def test_core_losses_clamp_with_the_shared_helper(upper: bool) -> None:
    from vlp_core.losses import ClipLoss, SigLipLoss

    for loss in (ClipLoss(), SigLipLoss(max_logit_scale=50.0)):
        pushed, after, bound = push_past_bound(loss, "logit_scale", upper=upper)
        assert abs(pushed - bound) > 0.85 and after == pytest.approx(bound, abs=1e-6)
        assert bound == (loss.max_log_scale if upper else 0.0)
