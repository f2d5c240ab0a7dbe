"""torchrun worker: a method's smoke preset trained for 2 steps at global batch 64 once per ``--accum`` value,
in one process group (one launch for the runs a test compares), each run into ``--out/accum<k>``.

Usage: ``accum_worker.py --method vlp_alip --world DIR --out DIR --accum 1 --accum 4 [--set key=value ...]``
(``--method``: the module holding ``METHOD``; default the CLIP baseline). AdamW's eps is 1e-3, as in
:mod:`vlp_core.testing.accumulate`.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from vlp_core.config import apply_overrides
from vlp_core.train.loop import run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="vlp_core.clip")
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--accum", type=int, action="append", required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    method = importlib.import_module(args.method).METHOD
    for accum in args.accum:
        cfg = method.preset("smoke")
        cfg.data.world_dir, cfg.train.output_dir = args.world, str(Path(args.out) / f"accum{accum}")
        cfg.train.steps, cfg.train.batch_size, cfg.train.accum_steps, cfg.train.save_every = 2, 64, accum, 2
        cfg.train.progress, cfg.eval.at_end, cfg.optim.eps = False, False, 1e-3
        apply_overrides(cfg, args.set)
        run(cfg, method)


if __name__ == "__main__":
    main()
