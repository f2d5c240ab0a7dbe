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


def check_exports(method, folder: str | Path, *, sizes: TinyClip = TinyClip(), seed: int = 0) -> None:
    """A ``method`` model with OpenAI-shaped towers of ``sizes`` (random weights) exported with
    ``vlp-convert --to open_clip`` and ``--to hf`` gives the same image and text embeddings in OpenCLIP and
    in transformers as in vlp (max difference <= 1e-5 x the largest value). For methods built on the dual
    encoder (their loss state is left out of the export)."""
    import open_clip  # test-only dependency
    import torch
    import transformers

    from vlp_core.config import apply_overrides
    from vlp_core.convert.cli import main as vlp_convert
    from vlp_core.convert.registry import Converted
    from vlp_core.convert.vlp_format import save_vlp_checkpoint
    from vlp_core.data.tokenizer import Tokenizer
    from vlp_core.train.loop import TrainStep

    folder = Path(folder)
    cfg = apply_overrides(method.preset("smoke"), sizes.overrides())
    tok = Tokenizer.from_pretrained("clip-bpe", context_length=sizes.context_length)
    torch.manual_seed(seed)
    step = TrainStep(method.build_model(cfg, tok), method.build_loss(cfg)).eval()
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.02 * torch.randn_like(p))
    src = folder / f"{method.name}.safetensors"
    save_vlp_checkpoint(Converted(state_dict=step.state_dict(), config=cfg, layout="vlp"), src)
    images = torch.randn(2, 3, sizes.image_size, sizes.image_size)
    tokens = tok(["a red circle", "two blue squares next to a green star"])
    with torch.no_grad():
        want = step.model.encode_image(images), step.model.encode_text(tokens)

    def close(got: tuple, what: str) -> None:
        for a, b in zip(got, want):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), f"{what}: {(a - b).abs().max()}"

    assert vlp_convert([str(src), str(folder / "oc.safetensors"), "--to", "open_clip"]) == 0
    oc = open_clip.model.CLIP(
        sizes.embed_dim,
        open_clip.model.CLIPVisionCfg(layers=sizes.layers, width=sizes.width, head_width=64, patch_size=sizes.patch,
                                      image_size=sizes.image_size),
        open_clip.model.CLIPTextCfg(context_length=sizes.context_length, vocab_size=49408, width=sizes.text_width,
                                    heads=sizes.text_width // 64, layers=sizes.text_layers),
    ).eval()
    from safetensors.torch import load_file

    oc.load_state_dict(load_file(str(folder / "oc.safetensors")), strict=True)
    with torch.no_grad():
        close((oc.encode_image(images), oc.encode_text(tokens)), "open_clip")
    assert vlp_convert([str(src), str(folder / "hf"), "--to", "hf"]) == 0
    hf = transformers.CLIPModel.from_pretrained(str(folder / "hf")).eval()
    with torch.no_grad():
        got = hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=tokens)
        # transformers 5 returns model outputs (the embedding as pooler_output), 4.x the tensors.
        close(tuple(g if isinstance(g, torch.Tensor) else g.pooler_output for g in got), "hf")
