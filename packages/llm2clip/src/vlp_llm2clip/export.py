"""Export the vision tower of a vlp run checkpoint (e.g. a CLIP demo) as a whole-tower file for stage 2.

    python -m vlp_llm2clip.export runs/clip-demo/checkpoints/step_00000300.pt /tmp/clip_tower.safetensors
    llm2clip-train --set model.vision.pretrained=/tmp/clip_tower.safetensors

The file holds the tower's ``trunk.*`` weights only (the core's whole-tower layout); the projection and the
text tower are left behind, as LLM2CLIP trains a fresh projection and drops the CLIP text tower.
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["export_vision_tower", "main"]


def export_vision_tower(checkpoint: str | Path, out: str | Path, *, prefix: str = "model.visual.") -> Path:
    from safetensors.torch import save_file

    from vlp_core.train.checkpoint import CheckpointManager

    saved = CheckpointManager.load(checkpoint)
    state = saved.get("model", saved)
    tower = {k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)}
    if not tower:
        raise ValueError(f"{checkpoint} has no key under {prefix!r} (not a vlp dual-encoder run checkpoint?)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tower, str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m vlp_llm2clip.export CHECKPOINT OUT.safetensors", file=sys.stderr)
        return 2
    try:
        print(export_vision_tower(args[0], args[1]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
