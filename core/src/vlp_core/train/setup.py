"""What a run needs before its first step: folders, the data, tokenizer, model, loss and adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp_core.config import RunConfig
from vlp_core.distributed import DistInfo, is_main
from vlp_core.distributed.utils import decide_on_main
from vlp_core.logging.writer import RunWriter
from vlp_core.method import MethodSpec
from vlp_core.train.checkpoint import CheckpointManager

__all__ = ["Parts", "build_parts", "resolve_output_dir", "resolve_world", "evaluate", "load_tokenizer", "uses_world",
           "data_worlds", "configured_world", "NO_TOKENIZER"]

log = logging.getLogger("vlp")


@dataclass
class Parts:
    tokenizer: Any
    model: nn.Module
    loss: nn.Module
    adapter: Any
    train_data: str
    eval_root: Path | None


def resolve_output_dir(cfg: RunConfig) -> Path:
    """``train.output_dir``, or ``runs/<method>-<preset>-<time>`` (the newest such folder for ``--resume latest``).

    Decided (and created) on rank 0 and broadcast, so every rank writes to the same folder; an error there (a
    folder that cannot be created, or one that holds checkpoints without ``--resume``) is raised on every rank
    as the same one-line :class:`~vlp_core.distributed.utils.SharedError`, so no rank waits for rank 0.
    """

    def decide() -> str:
        out = cfg.train.output_dir
        if not out:
            stem = f"{cfg.method}-{cfg.preset}"
            previous = sorted(Path("runs").glob(f"{stem}-*")) if Path("runs").is_dir() else []
            if cfg.train.resume == "latest" and previous:
                out = str(previous[-1])
            else:
                out = f"runs/{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(out)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the run folder {path} (train.output_dir): {e.strerror or e}") from e
        ckpts = path / "checkpoints"
        if not cfg.train.resume and ckpts.is_dir() and CheckpointManager(ckpts).list():
            raise ValueError(f"{path} already holds checkpoints: pass --resume latest to continue that run, "
                             "or choose another --output-dir")
        return out

    out = decide_on_main(decide)
    cfg.train.output_dir = out
    return Path(out)


NO_TOKENIZER = (
    "model.text.tokenizer is not set and the training data is not the shapes world: set it, e.g. --set "
    "model.text.tokenizer=clip-bpe (OpenAI's BPE, offline) or a transformers tokenizer name/folder"
)


def configured_world(cfg: RunConfig) -> Path:
    """The folder ``ensure_world(cfg.data)`` uses: ``data.world_dir``, else the default cache folder."""
    from vlp_core.data.synthetic import default_world_dir

    d = cfg.data
    return Path(d.world_dir) if d.world_dir else default_world_dir(d.world_seed, d.world_noise,
                                                                   d.world_train_samples)


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def data_worlds(cfg: RunConfig) -> list[Path] | None:
    """The shapes worlds holding ``data.train_data``'s shards (in order of appearance), or None when any shard
    is not world data (see :func:`resolve_world`). An empty ``train_data`` gives ``[]``."""
    from vlp_core.data.synthetic import is_world
    from vlp_core.data.tario import expand_urls

    configured = _real(configured_world(cfg))
    worlds: dict[str, Path] = {}
    folders: set[str] = set()
    for url in expand_urls(cfg.data.train_data):  # every '::' source, brace-expanded
        if "://" in url or url.startswith("pipe:"):
            return None
        folder = os.path.dirname(url)
        if folder in folders:
            continue  # thousands of shards share a few folders: one check per folder
        folders.add(folder)
        root = Path(os.path.abspath(os.path.expanduser(folder or "."))).parent
        key = _real(root)
        if key != configured and not is_world(root):
            return None
        worlds.setdefault(key, configured_world(cfg) if key == configured else root)
    return list(worlds.values())


def uses_world(cfg: RunConfig) -> bool:
    """Whether the run trains on the shapes world: no ``data.train_data`` (the demo), or world data."""
    return not cfg.data.train_data.strip() or data_worlds(cfg) is not None


def _check_train_data(cfg: RunConfig) -> None:
    if cfg.data.require_train_data and not cfg.data.train_data.strip():
        raise ValueError(f"preset {cfg.preset!r} trains on real data: pass --train-data (e.g. "
                         "'laion/{00000..09999}.tar'); the shapes world is for the demo presets")


def resolve_world(cfg: RunConfig, info: DistInfo) -> Path | None:
    """The shapes world's folder when the run trains on it, generated once (by rank 0; the others wait); else None.

    How a run recognises world data: ``data.train_data`` is empty (the demo trains on ``<world>/train``), or
    every shard of it (each ``::`` source, brace-expanded; no remote or ``pipe:`` url) lies in a folder whose
    parent is a shapes world: a complete one (it holds ``world.json``; its shards are ``<world>/train/*.tar``,
    ``<world>/docs/*.tar``, or a method's own folder beside them), or the configured world folder
    (``data.world_dir``, else the default cache folder), which is generated first when absent. The world used
    (its ``tokenizer.json`` when ``model.text.tokenizer`` is empty, and its evaluation sets when ``eval.data``
    is empty) is the configured one when the data lies in it, else the first world of the data.

    Other data uses no world (None), so it is never generated for it: ``model.text.tokenizer`` must be set
    (else a ValueError here, before anything heavy; a missing shard is reported first), and evaluation needs
    ``eval.data`` (without it, it is skipped). A paper preset (``data.require_train_data``) with no
    ``data.train_data`` is an error, never the demo world.
    """
    _check_train_data(cfg)
    worlds = data_worlds(cfg)
    if worlds is None:
        if not cfg.model.text.tokenizer:
            from vlp_core.data.wds import parse_sources

            parse_sources(cfg.data.train_data, cfg.data.train_weights)  # names a missing shard first
            raise ValueError(f"{NO_TOKENIZER} (data.train_data={_short(cfg.data.train_data)})")
        return None
    configured = configured_world(cfg)
    if worlds and all(_real(w) != _real(configured) for w in worlds):
        return worlds[0]  # a complete world elsewhere: nothing to generate
    from vlp_core.data.synthetic import ensure_world

    decide_on_main(lambda: ensure_world(cfg.data) and None)  # generated once; an error there stops every rank
    return Path(ensure_world(cfg.data))  # already there: a cheap check on every rank


def _short(text: str, n: int = 100) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def load_tokenizer(cfg: RunConfig, world: Path | None):
    """``model.text.tokenizer``; when empty, ``<world>/tokenizer.json``, only for world data (``world`` given
    and :func:`uses_world`). Raises ValueError (:data:`NO_TOKENIZER`) otherwise."""
    from vlp_core.data.tokenizer import Tokenizer

    source = cfg.model.text.tokenizer
    if not source:
        if world is None or not uses_world(cfg):
            raise ValueError(NO_TOKENIZER)
        source = str(Path(world) / "tokenizer.json")
    return Tokenizer.from_pretrained(source, context_length=cfg.model.text.context_length)


def _world_train_pattern(world: Path) -> str:
    shards = sorted((world / "train").glob("*.tar"))
    if not shards:
        raise ValueError(f"no training shards in {world / 'train'}")
    return f"{world}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


def build_parts(cfg: RunConfig, method: MethodSpec, *, world: Path | None, device: torch.device) -> Parts:
    """Tokenizer, model, loss and adapter; the training shards (the world's train split for the demo); and
    the evaluation root: ``eval.data``, else the world (None for other data: evaluation is then skipped)."""
    tokenizer = load_tokenizer(cfg, world)
    model = method.build_model(cfg, tokenizer)
    loss = method.build_loss(cfg)
    adapter = method.build_adapter(cfg, tokenizer)
    train_data = cfg.data.train_data or _world_train_pattern(world)  # type: ignore[arg-type]
    eval_root = Path(cfg.eval.data) if cfg.eval.data else world
    if is_main() and eval_root is None and (cfg.eval.at_end or cfg.train.eval_every > 0):
        named = [f"eval.{k}" for k in ("imagefolder", "wds") if getattr(cfg.eval, k)]
        if named:
            log.info("no eval.data: evaluating %s only", " and ".join(named))
        else:
            log.info("no eval.data: skipping evaluation")
    if is_main():
        n_params = sum(p.numel() for p in model.parameters())
        log.info("%s model: %.2fM parameters; training data: %s", method.name, n_params / 1e6, train_data)
    return Parts(tokenizer=tokenizer, model=model, loss=loss, adapter=adapter, train_data=train_data,
                 eval_root=eval_root)


def build_scorer(method: MethodSpec, model: nn.Module):
    if method.build_scorer is not None:
        return method.build_scorer(model)
    from vlp_core.eval import EmbeddingScorer

    return EmbeddingScorer(model)


def eval_autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    if device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(cfg: RunConfig, method: MethodSpec, parts: Parts, step_module: nn.Module, writer: RunWriter,
             step: int, device: torch.device) -> dict[str, float]:
    """Every rank evaluates its share of each set; results are identical on all ranks.

    Without an evaluation root (real data without ``eval.data``; :func:`build_parts` logged it once) only the
    sets named on their own run: ``eval.imagefolder`` (e.g. ImageNet) and ``eval.wds`` (CLIP_benchmark);
    with neither, returns ``{}``.
    """
    eval_cfg = cfg.eval
    if parts.eval_root is None:
        if not (cfg.eval.imagefolder or cfg.eval.wds):
            return {}
        eval_cfg = dataclasses.replace(cfg.eval, zeroshot="", retrieval="", compositional="")
    from vlp_core.eval import preprocess_kwargs, run_evaluation

    model = step_module.model if hasattr(step_module, "model") else step_module
    scorer = build_scorer(method, model)
    was_training = model.training
    model.eval()
    with eval_autocast(device, cfg.train.precision):
        results = run_evaluation(scorer, parts.tokenizer, eval_cfg, root=parts.eval_root or ".",
                                 **preprocess_kwargs(cfg.model.vision), device=device,
                                 log=log.info if is_main() else (lambda *a: None))
        if parts.eval_root is not None:
            results.update(_linear_probe(cfg, model, parts.eval_root, device))
    model.train(was_training)
    writer.scalars(step, {f"eval/{k}": v for k, v in results.items()})
    if is_main():
        out = Path(cfg.train.output_dir) / "eval.jsonl"
        with open(out, "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")
        log.info("eval at step %d: %s", step, format_results(results))
    return results


def _linear_probe(cfg: RunConfig, model: nn.Module, root: str | Path, device: torch.device) -> dict[str, float]:
    """``eval.linear_probe``: a linear probe of the frozen ``model.visual`` on each named zero-shot set."""
    from vlp_core.eval.linear_probe import probe_vision_tower
    from vlp_core.eval.runner import eval_dir_for, split_names
    from vlp_core.models.vit import VisionTower

    sets = split_names(cfg.eval.linear_probe)
    if not sets:
        return {}
    tower = getattr(model, "visual", None)
    if not isinstance(tower, VisionTower):
        raise ValueError(f"eval.linear_probe: the {cfg.method} model has no ViT image tower at .visual")
    return probe_vision_tower(tower, cfg.model.vision, eval_dir_for(cfg.eval, root), sets, device=device,
                              batch_size=cfg.eval.batch_size)


def format_results(results: dict[str, float]) -> str:
    keys = [k for k in results if k.endswith(("top1", "R@1", "accuracy", "mean_recall"))]
    return ", ".join(f"{k} {results[k]:.1f}" for k in keys)
