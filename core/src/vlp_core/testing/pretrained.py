"""Test helpers for starting runs from released weights: a small OpenCLIP model, converted the user's way.

``openclip_checkpoint(folder)`` builds a small, randomly initialised OpenCLIP ``CLIP`` (OpenCLIP is a
test-only dependency, imported here lazily), saves its state dict as OpenCLIP does, converts it with
``vlp-convert`` and returns the vlp file together with the ``--set`` overrides that give a run towers of the
same shape. Every method package's ``--init-from`` test uses it, so the same released layout is proven
against every model that has a CLIP-style tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["TinyClip", "openclip_checkpoint"]


@dataclass(frozen=True)
class TinyClip:
    """Sizes of the small OpenCLIP model (head width 64, as every OpenCLIP ViT; GELU, as OpenCLIP's own)."""

    image_size: int = 32
    patch: int = 8
    width: int = 64
    layers: int = 1
    text_width: int = 64
    text_layers: int = 1
    embed_dim: int = 32
    context_length: int = 77

    def vision_overrides(self) -> list[str]:
        return [f"model.vision.{k}={v}" for k, v in dict(
            timm_name="", image_size=self.image_size, patch_size=self.patch, width=self.width, depth=self.layers,
            heads=self.width // 64, mlp_ratio=4.0, pre_norm=True, act="gelu", norm_eps=1e-5, stem="patch",
            class_token=True, pool="token", interpolation="bicubic").items()]

    def text_overrides(self) -> list[str]:
        return [f"model.text.{k}={v}" for k, v in dict(
            kind="clip", tokenizer="clip-bpe", context_length=self.context_length, width=self.text_width,
            depth=self.text_layers, heads=self.text_width // 64, mlp_ratio=4.0, causal=True, pool="eot",
            act="gelu", norm_eps=1e-5).items()]

    def overrides(self) -> list[str]:
        """``--set`` values giving a run both towers (and the shared space) of this model."""
        return [*self.vision_overrides(), *self.text_overrides(), f"model.embed_dim={self.embed_dim}"]


def openclip_checkpoint(folder: str | Path, sizes: TinyClip = TinyClip(), *, seed: int = 0) -> Path:
    """Write ``folder/open_clip.safetensors`` (OpenCLIP's layout) and convert it to ``folder/vlp.safetensors``.

    Returns:
        The converted vlp checkpoint.
    """
    import open_clip  # test-only dependency
    import torch
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    from safetensors.torch import save_file

    from vlp_core.convert.cli import main as vlp_convert

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = CLIP(
        sizes.embed_dim,
        CLIPVisionCfg(layers=sizes.layers, width=sizes.width, head_width=64, patch_size=sizes.patch,
                      image_size=sizes.image_size),
        CLIPTextCfg(context_length=sizes.context_length, vocab_size=49408, width=sizes.text_width, heads=
                    sizes.text_width // 64, layers=sizes.text_layers),
    )
    assert isinstance(model, open_clip.CLIP)
    raw = folder / "open_clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(raw))
    out = folder / "vlp.safetensors"
    if vlp_convert([str(raw), str(out), "--arch", "gelu"]) != 0:
        raise RuntimeError(f"vlp-convert could not convert {raw}")
    return out


def train_from_checkpoint(
    train_main, checkpoint: Path, world: Path, out: Path, *extra: str, sizes: TinyClip = TinyClip(),
    towers: str = "visual,text",
) -> int:
    """``<m>-train --preset smoke --init-from checkpoint`` for 2 steps on ``world`` with towers of ``sizes``,
    then evaluation on the world's colour zero-shot set. Only the towers named in ``towers`` get the
    checkpoint's sizes. Returns the CLI's exit code."""
    args = ["--preset", "smoke", "--init-from", str(checkpoint), "--steps", "2", "--output-dir", str(out),
            "--set", f"data.world_dir={world}", "--set", "train.progress=false", "--set", f"train.init_towers={towers}",
            "--set", "eval.zeroshot=zeroshot_color", "--set", "eval.retrieval=", "--set", "eval.compositional="]
    chosen = ([*sizes.vision_overrides()] if "visual" in towers else []) + \
        ([*sizes.text_overrides(), f"model.embed_dim={sizes.embed_dim}"] if "text" in towers else [])
    for item in [*chosen, *extra]:
        args += ["--set", item]
    return train_main(args)
