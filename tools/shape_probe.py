#!/usr/bin/env python
"""How fast can an image tower learn *shape* on the shapes world? A supervised diagnostic.

    python tools/shape_probe.py --targets shape          # shape labels only
    python tools/shape_probe.py --targets shape,color    # shape and colour heads on shared features
    python tools/shape_probe.py --tower cnn --steps 1000 --targets shape,color

Trains a tower from scratch with cross-entropy on the *main object* (the first large object, else the
first one) of each training image, and every ``--eval-every`` steps reports the shape accuracy of the
shape head on the held-out colour x shape zero-shot set (single objects; chance 16.7%), overall and for small
and large objects separately. ``--tower demo`` is the vision tower of ``clip-train``'s demo preset (or any
preset: ``--preset``; ``--stem patch`` swaps its convolutional stem for timm's linear patch embedding);
``--tower cnn`` is a plain 4-layer GroupNorm CNN of the same stride and width, which is faster on the CPU.

Why it exists: the demo's zero-shot colour x shape accuracy is limited by how many samples the image tower
needs before it starts to separate shapes, and this measures that directly, without the text tower or the
contrastive loss. Images are decoded once into memory (about 250 MB for the default world).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _load_folder(folder: Path) -> tuple[torch.Tensor, list[dict]]:
    """Every image of a shard folder (uint8 ``[N, 3, S, S]``) and its ``json`` metadata, in shard order."""
    from vlp_core.data.tario import iter_samples
    from vlp_core.data.transforms import decode_image

    images, metas = [], []
    for url in sorted(map(str, folder.glob("*.tar"))):
        for s in iter_samples(url):
            images.append(torch.from_numpy(np.array(decode_image(s["jpg"]))).permute(2, 0, 1).contiguous())
            metas.append(json.loads(s["json"]))
    return torch.stack(images), metas


def _cnn(width: int) -> nn.Module:
    def block(i: int, o: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.GroupNorm(8, o), nn.GELU()]

    return nn.Sequential(*block(3, width // 3, 2), *block(width // 3, 2 * width // 3, 2),
                         *block(2 * width // 3, width, 2), *block(width, width, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default="", help="shapes world folder (default: the demo's, generated if absent)")
    p.add_argument("--tower", choices=("demo", "cnn"), default="demo")
    p.add_argument("--preset", default="demo", help="clip preset whose vision tower --tower demo builds")
    p.add_argument("--stem", choices=("preset", "conv", "patch"), default="preset",
                   help="--tower demo's patch embedding: the preset's, the convolutional stem, or timm's linear one")
    p.add_argument("--targets", default="shape", help="comma list of heads: shape, color")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if set(targets) - {"shape", "color"} or "shape" not in targets:
        p.error(f"--targets must include 'shape' and may add 'color'; got {a.targets!r}")

    from vlp_core.clip import METHOD
    from vlp_core.data.synthetic import COLORS, SHAPES, ensure_world, main_object
    from vlp_core.data.transforms import prepare_images
    from vlp_core.models.vit import build_vision_tower

    cfg = METHOD.preset(a.preset)
    world = Path(a.world) if a.world else ensure_world(cfg.data)
    t0 = time.perf_counter()
    train_x, train_meta = _load_folder(world / "train")
    eval_x, eval_meta = _load_folder(world / "eval" / "zeroshot_color_shape")  # one object per image
    print(f"loaded {len(train_x)} training and {len(eval_x)} evaluation images in {time.perf_counter() - t0:.0f} s")
    mains = [main_object(m["objects"]) for m in train_meta]
    labels = {"shape": torch.tensor([SHAPES.index(o["shape"]) for o in mains]),
              "color": torch.tensor([COLORS.index(o["color"]) for o in mains])}
    eval_shape = torch.tensor([SHAPES.index(m["objects"][0]["shape"]) for m in eval_meta])
    eval_size = [m["objects"][0]["size"] for m in eval_meta]
    by_size = {size: torch.tensor([s == size for s in eval_size]) for size in ("small", "large")}

    if a.tower == "demo":
        if a.stem != "preset":
            cfg.model.vision.stem = a.stem
        tower = build_vision_tower(cfg.model.vision)
        features = lambda x: tower(x).pooled  # noqa: E731
        width = tower.width
    else:
        width = cfg.model.vision.width
        tower = _cnn(width)
        features = tower
    heads = nn.ModuleDict({t: nn.Linear(width, len(SHAPES) if t == "shape" else len(COLORS)) for t in targets})
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(a.seed)
    stem = f" stem={cfg.model.vision.stem}" if a.tower == "demo" else ""
    print(f"tower={a.tower}{stem} targets={targets} batch={a.batch} lr={a.lr}")
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(train_x), (a.batch,), generator=gen)
        f = features(prepare_images(train_x[idx], "cpu"))
        loss = sum(F.cross_entropy(heads[t](f), labels[t][idx]) for t in targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % a.eval_every == 0 or step == a.steps:
            tower.eval()
            with torch.no_grad():
                pred = torch.cat([heads["shape"](features(prepare_images(eval_x[i:i + 512], "cpu"))).argmax(1)
                                  for i in range(0, len(eval_x), 512)])
            tower.train()
            hit = (pred == eval_shape).float()
            acc = {k: 100 * hit[m].mean().item() for k, m in by_size.items()}
            rate = step * a.batch / (time.perf_counter() - t0)
            print(f"step {step:5d}  samples {step * a.batch:7d}  loss {loss.item():.3f}  shape accuracy "
                  f"{100 * hit.mean().item():5.1f}% (small {acc['small']:5.1f}%, large {acc['large']:5.1f}%)  "
                  f"({rate:.0f} samples/s)", flush=True)


if __name__ == "__main__":
    main()
