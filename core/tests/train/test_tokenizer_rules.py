"""Which tokenizer and which evaluation data a run gets: the shapes world's only for shapes-world data.

Rules (``vlp_core.train.setup``): the demo (no ``data.train_data``) and world data (every shard in a folder whose
parent is a shapes world) use the world: its ``tokenizer.json`` when ``model.text.tokenizer`` is empty, and its
evaluation sets when ``eval.data`` is empty. Any other data needs a named tokenizer (a one-line ValueError,
before anything is built or generated) and is evaluated only on ``eval.data`` (else evaluation is skipped).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import vlp_core.data.synthetic as synthetic
from vlp_core.clip import METHOD
from vlp_core.config import RunConfig
from vlp_core.data.tario import ShardWriter, iter_samples
from vlp_core.data.tokenizer import Tokenizer
from vlp_core.distributed import DistInfo
from vlp_core.logging.writer import RunWriter
from vlp_core.train.setup import NO_TOKENIZER, build_parts, evaluate, load_tokenizer, resolve_world

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
NO_EVAL_SETS = dict.fromkeys(synthetic.DEFAULT_EVAL_SIZES, 0)


def smoke(world_dir: Path, train_data: str = "", tokenizer: str = "") -> RunConfig:
    cfg = METHOD.preset("smoke")
    cfg.data.world_dir, cfg.data.train_data, cfg.model.text.tokenizer = str(world_dir), train_data, tokenizer
    return cfg


def write_shard(path: Path, world: Path, n: int = 8) -> Path:
    """``n`` image-caption samples (taken from ``world``) as one webdataset shard at ``path``."""
    samples = list(iter_samples(str(world / "train" / "00000.tar")))[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    with ShardWriter(str(path.parent / "%05d.tar"), max_count=1000) as w:
        for i, s in enumerate(samples):
            w.write({"__key__": f"s{i:04d}", "jpg": s["jpg"], "txt": s["txt"]})
    (path.parent / "00000.tar").rename(path)
    return path


@pytest.fixture()
def no_generation(monkeypatch):
    """Fails the test if anything asks for the configured shapes world to be generated or checked."""
    def refuse(cfg):
        raise AssertionError(f"ensure_world called for {cfg.world_dir}")

    monkeypatch.setattr(synthetic, "ensure_world", refuse)


def world_ids(world: Path, cfg: RunConfig, texts: list[str]) -> torch.Tensor:
    return Tokenizer.from_pretrained(str(world / "tokenizer.json"), context_length=cfg.model.text.context_length)(
        texts)


TEXTS = ["a small red circle at the top left", "two blue stars"]


def test_demo_uses_the_world_tokenizer_and_evaluation(tiny_world: Path) -> None:
    cfg = smoke(tiny_world)
    world = resolve_world(cfg, INFO)
    assert world == tiny_world
    tok = load_tokenizer(cfg, world)
    assert tok.name == str(tiny_world / "tokenizer.json")
    assert torch.equal(tok(TEXTS), world_ids(tiny_world, cfg, TEXTS))
    parts = build_parts(cfg, METHOD, world=world, device=torch.device("cpu"))
    assert parts.eval_root == tiny_world and parts.train_data.startswith(f"{tiny_world}/train/")


def test_world_shards_elsewhere_use_that_world(tiny_world: Path, tmp_path: Path, no_generation) -> None:
    """Shards of a complete world (train and docs, '::'-joined) are world data, whatever data.world_dir says."""
    data = f"{tiny_world}/train/{{00000..00003}}.tar::{tiny_world}/docs/00000.tar"
    cfg = smoke(tmp_path / "not-generated", data)
    world = resolve_world(cfg, INFO)
    assert world == tiny_world and not (tmp_path / "not-generated").exists()
    assert torch.equal(load_tokenizer(cfg, world)(TEXTS), world_ids(tiny_world, cfg, TEXTS))
    cfg.eval.at_end = False
    assert build_parts(cfg, METHOD, world=world, device=torch.device("cpu")).eval_root == tiny_world


def test_method_shards_beside_a_world_are_world_data(tiny_world: Path, tmp_path: Path, no_generation) -> None:
    world = synthetic.generate_world(tmp_path / "w", train_samples=8, docs=0, shard_size=8,
                                     eval_sizes=NO_EVAL_SETS, progress=False)
    write_shard(world / "my-method" / "00000.tar", tiny_world)
    cfg = smoke(tmp_path / "other", f"{world}/my-method/00000.tar::{world}/train/00000.tar")
    assert resolve_world(cfg, INFO) == world
    assert load_tokenizer(cfg, world).name == str(world / "tokenizer.json")


def test_configured_world_is_generated_for_its_own_shards(tiny_world: Path, tmp_path: Path, monkeypatch) -> None:
    """A preset may point train_data into the configured world before it exists (vlp-lcl's demo does)."""
    calls = []

    def ensure(data_cfg):
        calls.append(data_cfg.world_dir)
        return synthetic.generate_world_atomic(data_cfg.world_dir, train_samples=8, docs=2, shard_size=8,
                                               eval_sizes=NO_EVAL_SETS, progress=False)

    monkeypatch.setattr(synthetic, "ensure_world", ensure)
    fresh = tmp_path / "fresh"
    cfg = smoke(fresh, f"{fresh}/train/00000.tar::{fresh}/docs/00000.tar")
    assert resolve_world(cfg, INFO) == fresh and synthetic.is_world(fresh) and calls
    assert torch.equal(load_tokenizer(cfg, fresh)(TEXTS), world_ids(tiny_world, cfg, TEXTS))


@pytest.mark.parametrize("kind", ["folder", "mixed", "eval-split", "remote"])
def test_other_data_without_tokenizer_stops_at_once(tiny_world: Path, tmp_path: Path, no_generation,
                                                    kind: str) -> None:
    own = write_shard(tmp_path / "shards" / "00000.tar", tiny_world)
    data = {
        "folder": f"{tmp_path}/shards/{{00000..00000}}.tar",
        "mixed": f"{tiny_world}/train/00000.tar::{own}",  # one source is not world data: the run is not
        "eval-split": f"{tiny_world}/eval/retrieval/00000.tar",  # <world>/eval is not a world
        "remote": "https://example.com/shards/{00000..00009}.tar",
    }[kind]
    cfg = smoke(tmp_path / "world", data)
    with pytest.raises(ValueError) as err:
        resolve_world(cfg, INFO)
    message = str(err.value)
    assert message.startswith(NO_TOKENIZER) and "\n" not in message
    assert "--set model.text.tokenizer=clip-bpe" in message and "data.train_data=" in message
    assert not (tmp_path / "world").exists()
    # Handing the world in anyway (as the linear probe does) does not make its tokenizer apply.
    with pytest.raises(ValueError, match="model.text.tokenizer is not set"):
        load_tokenizer(cfg, tiny_world)


def test_missing_shard_is_reported_before_the_tokenizer(tmp_path: Path, no_generation) -> None:
    cfg = smoke(tmp_path / "world", f"{tmp_path}/nope-{{0..3}}.tar")
    with pytest.raises(ValueError, match="shard not found: .*nope-0.tar"):
        resolve_world(cfg, INFO)


def test_other_data_with_clip_bpe_skips_evaluation_without_eval_data(
        tiny_world: Path, tmp_path: Path, no_generation, caplog, monkeypatch) -> None:
    own = write_shard(tmp_path / "shards" / "00000.tar", tiny_world)
    cfg = smoke(tmp_path / "world", str(own), tokenizer="clip-bpe")
    cfg.train.eval_every = 2
    world = resolve_world(cfg, INFO)
    assert world is None and not (tmp_path / "world").exists()
    with caplog.at_level(logging.INFO, logger="vlp"):
        parts = build_parts(cfg, METHOD, world=world, device=torch.device("cpu"))
    assert parts.tokenizer.name == "clip-bpe" and parts.tokenizer.vocab_size == 49408
    assert parts.eval_root is None and parts.train_data == str(own)
    assert [r.getMessage() for r in caplog.records].count("no eval.data: skipping evaluation") == 1

    import vlp_core.eval as vlp_eval

    monkeypatch.setattr(vlp_eval, "run_evaluation", lambda *a, **k: pytest.fail("evaluation ran"))
    cfg.train.output_dir = str(tmp_path / "run")
    writer = RunWriter(tmp_path / "run", enabled=False)
    assert evaluate(cfg, METHOD, parts, parts.model, writer, 2, torch.device("cpu")) == {}
    assert not (tmp_path / "run" / "eval.jsonl").exists()


def test_other_data_with_eval_data_evaluates_there(tiny_world: Path, tmp_path: Path, no_generation,
                                                   caplog) -> None:
    own = write_shard(tmp_path / "shards" / "00000.tar", tiny_world)
    cfg = smoke(tmp_path / "world", str(own), tokenizer=str(tiny_world / "tokenizer.json"))
    cfg.eval.data = str(tiny_world)
    world = resolve_world(cfg, INFO)
    assert world is None
    with caplog.at_level(logging.INFO, logger="vlp"):
        parts = build_parts(cfg, METHOD, world=world, device=torch.device("cpu"))
    assert parts.eval_root == tiny_world
    assert "skipping evaluation" not in caplog.text


def test_vit_b32_on_real_data_records_clip_bpe(tiny_world: Path, tmp_path: Path, capsys) -> None:
    """The README's command: `clip-train --preset vit_b32 --train-data X` trains with the CLIP BPE tokenizer
    (recorded in config.yaml); with the tokenizer unset it stops at once with the one-line error. Depth 1 keeps
    the step cheap; every other setting is the preset's."""
    import yaml

    from vlp_core.clip.cli import train_main

    own = write_shard(tmp_path / "shards" / "00000.tar", tiny_world, n=4)
    common = ["--preset", "vit_b32", "--train-data", str(own), "--steps", "1", "--batch-size", "2", "--workers", "0",
              "--set", "model.vision.depth=1", "--set", "model.text.depth=1", "--set", "train.progress=false",
              "--set", "train.save_every=100"]
    assert train_main([*common, "--output-dir", str(tmp_path / "run")]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["text"]["tokenizer"] == "clip-bpe" and saved["model"]["text"]["context_length"] == 77
    capsys.readouterr()
    assert train_main([*common, "--set", "model.text.tokenizer=", "--output-dir", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.text.tokenizer is not set" in err and "clip-bpe" in err


def test_paper_preset_without_train_data_is_an_error(tmp_path: Path, no_generation) -> None:
    """`clip-train --preset vit_b32` with no --train-data must not train ViT-B/32 on the shapes world."""
    cfg = METHOD.preset("vit_b32")
    cfg.data.world_dir = str(tmp_path / "world")
    with pytest.raises(ValueError, match="preset 'vit_b32' trains on real data: pass --train-data"):
        resolve_world(cfg, INFO)
