"""Linear probe on frozen image features: multinomial logistic regression fitted by L-BFGS in float64.

Shape legend:
    B: batch of images, N: items, F: feature width, C: classes.

For methods whose product is the ViT (LCL, and any method compared with it) this measures the frozen
tower rather than an image-text head. :func:`vit_features` is the default feature map: the mean of the patch
tokens concatenated with the class token (when the tower has one), both after the final norm.

Sharding: every rank extracts features for its share of the set (positions ``rank`` modulo ``world_size``),
the rows are gathered and put back in position order, so the probe (and its train/test split: every
``test_every``-th sample is held out) is identical on every rank and for any world size. The fit is
deterministic (full-batch L-BFGS from zero, float64, standardised features).

Run on a trained checkpoint of any method (the tower is ``model.<tower>``, ``visual`` by default)::

    python -m vlp_core.eval.linear_probe --method clip runs/clip-demo-...  [--sets zeroshot_shape,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.data.transforms import CLIP_MEAN, CLIP_STD, prepare_images
from vlp_core.eval.scorer import all_gather_rows, dist_rank_world

__all__ = ["vit_features", "fit_linear_probe", "extract_features", "linear_probe_eval", "run_linear_probe",
           "probe_vision_tower"]


def vit_features(tower: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``images_BCHW -> [B, F]``: patch-token mean, then the class token if any (a ``VisionTower``)."""

    def features(images_BCHW: torch.Tensor) -> torch.Tensor:
        out = tower(images_BCHW)
        parts = [out.patches.mean(dim=1)]
        if out.prefix.shape[1]:
            parts.append(out.prefix[:, 0])
        return torch.cat(parts, dim=-1)

    return features


def fit_linear_probe(x_NF: torch.Tensor, y_N: torch.Tensor, num_classes: int, *, weight_decay: float = 1e-3,
                     max_iter: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise ``mean CE(x W + b, y) + weight_decay / 2 * ||W||^2`` over standardised features.

    Returns:
        ``(W [F, C], b [C], mean [F], std [F])``; predict with ``((x - mean) / std) @ W + b``.
    """
    x = x_NF.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ W + b, y_N) + 0.5 * weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach(), mean, std


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[Any, ...]], *,
                     device: torch.device | str, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of the whole set on every rank, in sample-position order.

    ``batches`` yield ``(images_uint8_BCHW, labels_B)`` for this rank's share (positions ``rank`` modulo
    ``world_size``, as the zero-shot readers produce); an undecodable sample shifts the positions after it.
    Images are normalised with ``mean``/``std`` ([0, 1] units, ``model.vision.image_mean``/``image_std``).
    """
    rank, world = dist_rank_world()
    feats, labels = [], []
    for images, y in batches:
        feats.append(feature_fn(prepare_images(images, torch.device(device), mean=mean, std=std)).double().cpu())
        labels.append(y.cpu())
    x = torch.cat(feats) if feats else None
    yy = torch.cat(labels) if labels else None
    pos = None if x is None else rank + world * torch.arange(x.shape[0])
    x_all = all_gather_rows(x, device)
    y_all = all_gather_rows(yy.to(device) if yy is not None else None, device)
    pos_all = all_gather_rows(pos.to(device) if pos is not None else None, device)
    if x_all is None or y_all is None or pos_all is None:
        raise ValueError("the linear-probe set is empty on every rank")
    order = torch.argsort(pos_all.cpu())
    return x_all.cpu()[order], y_all.cpu()[order]


def linear_probe_eval(x_NF: torch.Tensor, y_N: torch.Tensor, num_classes: int, *, test_every: int = 3,
                      weight_decay: float = 1e-3) -> dict[str, float]:
    """Fit on every sample but each ``test_every``-th, report top-1 (%) on those held out and on the fit set."""
    held = torch.arange(x_NF.shape[0]) % test_every == 0
    if held.all() or not held.any():
        raise ValueError(f"linear probe: {x_NF.shape[0]} samples cannot be split with test_every={test_every}")
    W, b, mean, std = fit_linear_probe(x_NF[~held], y_N[~held], num_classes, weight_decay=weight_decay)

    def acc(mask: torch.Tensor) -> float:
        pred = (((x_NF[mask].double() - mean) / std) @ W + b).argmax(1)
        return 100.0 * float((pred == y_N[mask]).double().mean())

    return {"top1": acc(held), "train_top1": acc(~held), "n_train": float((~held).sum()),
            "n_test": float(held.sum())}


def run_linear_probe(feature_fn: Callable[[torch.Tensor], torch.Tensor], eval_dir: str | Path, sets: list[str], *,
                     image_size: int, device: torch.device | str, batch_size: int = 256, test_every: int = 3,
                     weight_decay: float = 1e-3, interpolation: str = "bilinear", mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> dict[str, float]:
    """Linear probe on each zero-shot set (``eval_dir/<set>``, labelled by ``cls``): ``"<set>/probe_top1"``...

    ``interpolation``, ``mean`` and ``std`` are the tower's preprocessing (``model.vision``).
    """
    from vlp_core.eval.datasets import load_zeroshot_shards

    rank, world = dist_rank_world()
    results: dict[str, float] = {}
    for name in sets:
        batches, classnames, _ = load_zeroshot_shards(Path(eval_dir) / name, image_size=image_size, rank=rank,
                                                      world_size=world, batch_size=batch_size,
                                                      interpolation=interpolation)
        x, y = extract_features(feature_fn, batches, device=device, mean=mean, std=std)
        metrics = linear_probe_eval(x, y, len(classnames), test_every=test_every, weight_decay=weight_decay)
        results.update({f"{name}/probe_{k}": v for k, v in metrics.items()})
    return results


def probe_vision_tower(tower: nn.Module, vision: Any, eval_dir: str | Path, sets: list[str], *,
                       device: torch.device | str, batch_size: int = 256) -> dict[str, float]:
    """:func:`run_linear_probe` of a ``VisionTower`` with its config's preprocessing (``model.vision``)."""
    return run_linear_probe(vit_features(tower), eval_dir, sets, image_size=vision.image_size, device=device,
                            batch_size=batch_size, interpolation=vision.interpolation, mean=vision.image_mean,
                            std=vision.image_std)


def _load_method(name: str) -> Any:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="vlp.methods") if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group="vlp.methods"))
        raise ValueError(f"unknown method {name!r} (installed: {', '.join(known)})")
    return found[0].load()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlp_core.eval.linear_probe",
                                description="Linear probe of a trained run's frozen image tower on the shapes "
                                "world's zero-shot sets (sharded under torchrun).")
    p.add_argument("run", help="a run folder (its newest checkpoint) or a checkpoint file")
    p.add_argument("--method", required=True, help="method name (entry point in 'vlp.methods')")
    p.add_argument("--tower", default="visual", help="attribute of the model holding the ViT (default: visual)")
    p.add_argument("--sets", default="zeroshot_shape,zeroshot_color,zeroshot_color_shape")
    p.add_argument("--eval-data", help="folder holding eval/<set> (default: the run's shapes world)")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        results = _probe_run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"linear_probe: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    return 0


def _probe_run(args: argparse.Namespace) -> dict[str, float]:
    from vlp_core.config import from_dict
    from vlp_core.data.synthetic import ensure_world
    from vlp_core.eval.runner import eval_dir_for, split_names
    from vlp_core.train.checkpoint import CheckpointManager
    from vlp_core.train.loop import TrainStep
    from vlp_core.train.setup import load_tokenizer, uses_world

    method = _load_method(args.method)
    path = Path(args.run)
    if path.is_dir():
        path = CheckpointManager(path / "checkpoints" if (path / "checkpoints").is_dir() else path).latest() or path
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {args.run}")
    saved = CheckpointManager.load(path)
    preset = saved["config"].get("preset")
    cfg = method.preset(preset if preset in method.presets else method.default_preset)
    from_dict(cfg, saved["config"])
    cfg.eval.data = args.eval_data or cfg.eval.data
    # The shapes world only for a run that trained on it; other runs probe the sets of --eval-data.
    world = ensure_world(cfg.data) if uses_world(cfg) else None
    if world is None and not cfg.eval.data:
        raise ValueError(f"{args.run} was not trained on the shapes world: pass --eval-data (a folder with eval/<set>)")
    model = method.build_model(cfg, load_tokenizer(cfg, world))
    TrainStep(model, method.build_loss(cfg)).load_state_dict(saved["model"])
    tower = getattr(model, args.tower, None)
    if not isinstance(tower, nn.Module):
        raise ValueError(f"the {args.method} model has no image tower at .{args.tower}")
    tower.eval()
    return probe_vision_tower(tower, cfg.model.vision, eval_dir_for(cfg.eval, world), split_names(args.sets),
                              device="cpu")


if __name__ == "__main__":
    sys.exit(main())
