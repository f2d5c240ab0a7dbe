"""One-process checks of the parallel helpers and the DCP checkpoint folder (no process group).

- ``tower_blocks`` finds every block of both towers once (timm ViT, the CLIP text transformer, a transformers
  text tower), the units FSDP2 shards and compiles;
- ``full_norm`` clips exactly like ``torch.nn.utils.clip_grad_norm_`` on plain tensors;
- ``split_scalar_groups`` keeps every parameter and setting, with the 0-dim ones in groups of their own;
- a DCP folder saved in one process (sync and async) is atomic (``.tmp`` then rename, commit record last), listed
  beside ``.pt`` files, pruned, read back into a fresh module and optimizer bit-identically, and gathered
  into a plain dict by ``load_full_state`` / ``CheckpointManager.load``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vlp_core.clip import METHOD
from vlp_core.train.checkpoint import COMPLETE, CheckpointManager, is_trainer_checkpoint, load_full_state
from vlp_core.train.loop import TrainStep
from vlp_core.train.optim import build_optimizer
from vlp_core.train.parallel import full_norm, split_scalar_groups, tower_blocks


def smoke_step(seed: int = 0) -> tuple[TrainStep, torch.optim.Optimizer]:
    from vlp_core.data.tokenizer import Tokenizer

    cfg = METHOD.preset("smoke")
    cfg.model.text.tokenizer = "clip-bpe"
    torch.manual_seed(seed)
    tok = Tokenizer.from_pretrained("clip-bpe", context_length=cfg.model.text.context_length)
    module = TrainStep(METHOD.build_model(cfg, tok), METHOD.build_loss(cfg))
    optimizer = build_optimizer(module, cfg.optim, device=torch.device("cpu"))
    split_scalar_groups(optimizer)
    return module, optimizer


def fake_step(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for p in module.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()


def test_tower_blocks_cover_both_towers_once() -> None:
    module, _ = smoke_step()
    blocks = tower_blocks(module)
    visual, text = list(module.model.visual.blocks), list(module.model.text.blocks)
    assert [id(b) for b in blocks] == [id(b) for b in visual + text]


def test_tower_blocks_of_a_transformers_text_tower(tmp_path: Path) -> None:
    from transformers import BertConfig

    from vlp_core.models.text import HFTextTower

    BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    tower = HFTextTower(str(tmp_path), pad_id=0, from_config=True)
    wrapper = nn.Module()
    wrapper.text = tower
    assert [id(b) for b in tower_blocks(wrapper)] == [id(b) for b in tower.model.encoder.layer]


def test_full_norm_matches_clip_grad_norm() -> None:
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(())), nn.Parameter(torch.randn(4))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b, strict=True):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(a, 1.0)
    got = full_norm(b, 1.0)
    assert torch.equal(want, got)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.grad, q.grad)


def test_split_scalar_groups_keeps_every_parameter_and_setting() -> None:
    module, optimizer = smoke_step()
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert params == {id(p) for p in module.parameters() if p.requires_grad}
    for g in optimizer.param_groups:
        assert len({p.ndim == 0 for p in g["params"]}) == 1  # all scalars or none
    assert any(g["params"][0] is module.loss.loss.logit_scale for g in optimizer.param_groups)


@pytest.mark.parametrize("async_save", [False, True])
def test_dcp_folder_round_trip(tmp_path: Path, async_save: bool) -> None:
    module, optimizer = smoke_step(0)
    fake_step(module, optimizer)
    ckpts = CheckpointManager(tmp_path / "checkpoints", keep=2)
    ckpts.save({"step": 1, "model": {}}, 1)  # a single-file checkpoint in the same folder
    record = {"rng": torch.get_rng_state(), "data": {0: {"shard": 3, "offset": 512}}, "batches": 2, "samples": 8}
    for step in (2, 3):
        path = ckpts.save_dcp(step, module, optimizer, {"step": step, "scheduler": {"x": step}}, record,
                              async_save=async_save)
        assert path.name == f"step_{step:08d}"
    ckpts.finish()
    # keep=2: the file of step 1 was pruned; the folders carry the marker; no .tmp left
    assert [(s, p.name) for s, p in ckpts.list()] == [(2, "step_00000002"), (3, "step_00000003")]
    commit = json.loads((path / COMPLETE).read_text())
    assert commit["world_size"] == 1 and commit["step"] == 3
    # the commit record lists every file of the folder with its size (and the small ones' sha256)
    on_disk = {f.relative_to(path).as_posix(): f.stat().st_size for f in path.rglob("*") if f.is_file()}
    assert {k: v["size"] for k, v in commit["files"].items()} == {k: v for k, v in on_disk.items() if k != COMPLETE}
    assert {"meta.pt", "ranks/rank_00000.pt", ".metadata"} <= set(commit["files"])
    assert all("sha256" in commit["files"][k] for k in ("meta.pt", "ranks/rank_00000.pt", ".metadata"))
    assert not any("sha256" in v for k, v in commit["files"].items() if k.endswith(".distcp"))
    CheckpointManager.verify(path)
    assert not list(ckpts.folder.glob("*.tmp")) and is_trainer_checkpoint(path)
    assert ckpts.resolve("latest") == path and ckpts.resolve(str(path)) == path
    assert ckpts.resolve(str(tmp_path / "checkpoints")) == path

    fresh, fresh_opt = smoke_step(1)
    shared, records = CheckpointManager.load_dcp(path, fresh, fresh_opt)
    assert shared["step"] == 3 and shared["scheduler"] == {"x": 3} and shared["world_size"] == 1
    assert records[0]["data"] == record["data"] and torch.equal(records[0]["rng"], record["rng"])
    for (k, v), w in zip(module.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    for p, q in zip(module.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], fresh_opt.state[q][key]), key
    assert [g["lr"] for g in fresh_opt.param_groups] == [g["lr"] for g in optimizer.param_groups]

    full = load_full_state(path)
    assert full["step"] == 3 and len(full["ranks"]) == 1
    assert full["model"].keys() == module.state_dict().keys()
    assert all(torch.equal(full["model"][k], v) for k, v in module.state_dict().items())
    assert CheckpointManager.load(path)["model"].keys() == full["model"].keys()


def test_unfinished_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    ckpts = CheckpointManager(tmp_path)
    (tmp_path / "step_00000005.tmp").mkdir()  # a crashed save
    (tmp_path / "step_00000006").mkdir()  # no marker
    assert ckpts.list() == [] and ckpts.latest() is None
    with pytest.raises(ValueError, match="unfinished DCP checkpoint"):
        load_full_state(tmp_path / "step_00000006")
    with pytest.raises(ValueError, match=r"cannot resume from .*step_00000006: no commit record \(COMPLETE\)"):
        ckpts.resolve(str(tmp_path / "step_00000006"))
    assert ckpts.resolve("latest") is None  # nothing committed: a fresh start
