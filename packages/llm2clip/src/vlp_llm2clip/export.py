"""Export the vision tower of a vlp run checkpoint (e.g. a CLIP demo) as a whole-tower file for stage 2.

    python -m vlp_llm2clip.export runs/clip-demo/checkpoints/step_00000300.pt /tmp/clip_tower.safetensors
    llm2clip-train --set model.vision.pretrained=/tmp/clip_tower.safetensors

The file holds the tower's ``trunk.*`` weights only (the core's whole-tower layout); the projection and the
text tower are left behind, as LLM2CLIP trains a fresh projection and drops the CLIP text tower.

Hugging Face ``CLIPModel``/``CLIPVisionModel`` weights (``vision_model.*``) are converted to the same layout:

    python -m vlp_llm2clip.export --hf path/to/clip-vit-large-patch14 /tmp/tower.safetensors
    llm2clip-train --preset openai_l14_224 --set model.vision.pretrained=/tmp/tower.safetensors

(Stage 2 also reads HF folders, timm, OpenCLIP, OpenAI, EVA-CLIP and LLM2CLIP tower checkpoints directly through
``model.vision.pretrained``: see :mod:`vlp_llm2clip.vision`.)
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["export_vision_tower", "convert_hf_clip_vision", "export_hf_clip_vision", "main"]

_HF_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def convert_hf_clip_vision(state: dict) -> dict:
    """HF CLIP vision weights -> timm ViT keys under ``trunk.`` (q/k/v fused into ``qkv``).

    The timm model must be a CLIP-style ViT (``pre_norm``, class token, no patch bias, quick GELU for the
    OpenAI weights), e.g. the ``openai_l14_224`` preset's tower. HF's ``post_layernorm`` becomes timm's final ``norm``.
    """
    import torch

    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state) else ""
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "embeddings.class_embedding" not in sd:
        raise ValueError("not a Hugging Face CLIP vision state dict (no vision_model.embeddings.class_embedding)")
    out = {"cls_token": sd["embeddings.class_embedding"].reshape(1, 1, -1),
           "pos_embed": sd["embeddings.position_embedding.weight"].unsqueeze(0),
           "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
           "norm_pre.weight": sd["pre_layrnorm.weight"], "norm_pre.bias": sd["pre_layrnorm.bias"],
           "norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"]}
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    for i in range(depth):
        src = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [sd[f"{src}self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")])
            for hf, timm_name in _HF_BLOCK.items():
                out[f"blocks.{i}.{timm_name}.{kind}"] = sd[f"{src}{hf}.{kind}"]
    return {f"trunk.{k}": v.contiguous() for k, v in out.items()}


def export_hf_clip_vision(source: str | Path, out: str | Path) -> Path:
    from safetensors.torch import save_file

    from vlp_core.models.pretrained import read_state_dict

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(convert_hf_clip_vision(read_state_dict(str(source))), str(out))
    return out


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
    args = list(sys.argv[1:] if argv is None else argv)
    hf = bool(args) and args[0] == "--hf"
    if hf:
        args = args[1:]
    if len(args) != 2:
        print("usage: python -m vlp_llm2clip.export [--hf] CHECKPOINT OUT.safetensors", file=sys.stderr)
        return 2
    try:
        print(export_hf_clip_vision(*args) if hf else export_vision_tower(args[0], args[1]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
