"""OpenAI / OpenCLIP CLIP architectures, and the vlp run config that rebuilds each exactly.

:data:`CLIP_ARCHS` holds the OpenCLIP model names whose towers have the OpenAI layout (plain ViT image tower
with ``ln_pre``, causal text transformer), with the sizes of OpenCLIP's ``model_configs/<name>.json``.
The activation is not visible in a checkpoint's keys: names containing ``quickgelu`` use QuickGELU, and so
does ``ViT-L-14-336`` (only OpenAI released weights for it; OpenAI's models all use QuickGELU). Other names
use exact GELU (OpenCLIP's LAION/DataComp trainings).

Two generic names take every size from the checkpoint and the head counts from OpenAI's rule
(``width / 64``): ``quickgelu`` and ``gelu``. Use them for custom sizes only; a named arch is checked.
An OpenCLIP hub folder's ``open_clip_config.json`` names its own architecture
(:func:`arch_from_open_clip_config`).

:func:`openai_clip_config` is a plain function (the core ``vit_b32`` preset reuses it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vlp_core.clip.config import ClipConfig
from vlp_core.config import ModelConfig, RunConfig, TextConfig, VisionConfig
from vlp_core.convert.registry import ConversionError, listing

__all__ = [
    "ClipArch",
    "CLIP_ARCHS",
    "GENERIC_ARCHS",
    "CLIP_MEAN",
    "CLIP_STD",
    "openai_clip_config",
    "arch_config",
    "mlp_ratio_for",
    "arch_from_open_clip_config",
    "ClipSizes",
    "resolve_arch",
]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ClipArch:
    """Sizes of one CLIP model with OpenAI-layout towers (OpenCLIP's model config)."""

    name: str
    vision_width: int
    vision_layers: int
    vision_heads: int
    patch: int
    image_size: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    act: str  # "gelu" | "quick_gelu"
    vision_mlp_ratio: float = 4.0
    text_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def vision_mlp(self) -> int:
        """MLP hidden width of the image tower (``int(width * mlp_ratio)``, as timm and OpenCLIP compute it)."""
        return int(self.vision_width * self.vision_mlp_ratio)

    @property
    def text_mlp(self) -> int:
        return int(self.text_width * self.text_mlp_ratio)


def _pair(name: str, **sizes: object) -> list[ClipArch]:
    """``name`` (GELU) and ``name-quickgelu`` with the same sizes."""
    gelu = ClipArch(name=name, act="gelu", **sizes)  # type: ignore[arg-type]
    return [gelu, replace(gelu, name=f"{name}-quickgelu", act="quick_gelu")]


_B = dict(vision_width=768, vision_layers=12, vision_heads=12, image_size=224, text_width=512, text_layers=12,
          text_heads=8, embed_dim=512)
_L = dict(vision_width=1024, vision_layers=24, vision_heads=16, patch=14, text_width=768, text_layers=12,
          text_heads=12, embed_dim=768)
_H = dict(vision_width=1280, vision_layers=32, vision_heads=16, patch=14, image_size=224, text_width=1024,
          text_layers=24, text_heads=16, embed_dim=1024)

CLIP_ARCHS: dict[str, ClipArch] = {
    a.name: a
    for a in [
        *_pair("ViT-B-32", patch=32, **_B),
        *_pair("ViT-B-16", patch=16, **_B),
        *_pair("ViT-L-14", image_size=224, **_L),
        # OpenAI's ViT-L/14@336px: QuickGELU under both names (no GELU weights exist for it).
        ClipArch(name="ViT-L-14-336", image_size=336, act="quick_gelu", **_L),
        ClipArch(name="ViT-L-14-336-quickgelu", image_size=336, act="quick_gelu", **_L),
        *_pair("ViT-H-14", **_H),
        ClipArch(name="ViT-g-14", vision_width=1408, vision_layers=40, vision_heads=16, vision_mlp_ratio=4.3637,
                 patch=14, image_size=224, text_width=1024, text_layers=24, text_heads=16, embed_dim=1024,
                 act="gelu"),
        ClipArch(name="ViT-bigG-14", vision_width=1664, vision_layers=48, vision_heads=16, vision_mlp_ratio=4.9231,
                 patch=14, image_size=224, text_width=1280, text_layers=32, text_heads=20, embed_dim=1280,
                 act="gelu"),
    ]
}
# Sizes from the checkpoint, heads = width / 64 (OpenAI's rule), the named activation.
GENERIC_ARCHS: dict[str, str] = {"quickgelu": "quick_gelu", "gelu": "gelu"}


def mlp_ratio_for(hidden: int, width: int) -> float:
    """A ratio ``r`` with ``int(width * r) == hidden`` (timm's rule), as short as possible."""
    for digits in (4, 6, 10):
        r = round(hidden / width, digits)
        if int(width * r) == hidden and int(round(width * r)) == hidden:
            return r
    return (hidden + 0.25) / width


def openai_clip_config(
    vision_width: int = 768,
    vision_layers: int = 12,
    patch: int = 32,
    image_size: int = 224,
    text_width: int = 512,
    text_layers: int = 12,
    text_heads: int = 8,
    embed_dim: int = 512,
    context_length: int = 77,
    vocab_size: int = 49408,
    act: str = "gelu",
    *,
    vision_heads: int | None = None,
    vision_mlp_ratio: float = 4.0,
    text_mlp_ratio: float = 4.0,
    max_logit_scale: float = 100.0,
) -> RunConfig:
    """The vlp run config of an OpenAI/OpenCLIP CLIP with the OpenAI tower layout (defaults: ViT-B/32).

    Image tower: explicit timm ViT with ``ln_pre`` (``pre_norm``), LayerNorm eps 1e-5, class-token pooling,
    bicubic resizing and CLIP's mean/std. Text tower: causal transformer, first-EOT pooling, eps 1e-5, the
    ``clip-bpe`` tokenizer. Bias-free projections, InfoNCE loss.

    Args:
        vision_width, vision_layers, patch, image_size: Image tower sizes.
        text_width, text_layers, text_heads: Text tower sizes.
        embed_dim: Shared embedding size.
        context_length: Text positions.
        vocab_size: Token embedding rows (49408 for OpenAI's BPE).
        act: ``"gelu"`` or ``"quick_gelu"`` (both towers).
        vision_heads: Image attention heads; None = ``vision_width // 64`` (OpenAI's rule).
        vision_mlp_ratio, text_mlp_ratio: MLP hidden width / width.
        max_logit_scale: Cap on ``exp(logit_scale)`` (CLIP's 100).

    Returns:
        A fresh ``RunConfig`` for method ``clip`` (data/optim/train sections at their defaults).
    """
    vision = VisionConfig(
        image_size=image_size, patch_size=patch, width=vision_width, depth=vision_layers,
        heads=vision_heads or vision_width // 64, mlp_ratio=vision_mlp_ratio, class_token=True, extra_tokens=0,
        pool="token", act=act, pre_norm=True, norm_eps=1e-5, image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD), interpolation="bicubic", stem="patch",
    )
    text = TextConfig(
        kind="clip", tokenizer="clip-bpe", vocab_size=vocab_size, context_length=context_length,
        width=text_width, depth=text_layers, heads=text_heads, mlp_ratio=text_mlp_ratio, causal=True,
        pool="eot", act=act, norm_eps=1e-5,
    )
    model = ModelConfig(vision=vision, text=text, embed_dim=embed_dim, image_proj="linear", text_proj="linear")
    return RunConfig(method="clip", model=model,
                     loss=ClipConfig(kind="infonce", max_logit_scale=max_logit_scale))


def arch_config(arch: ClipArch, **overrides: object) -> RunConfig:
    """:func:`openai_clip_config` for a :class:`ClipArch` (``overrides`` e.g. ``max_logit_scale``)."""
    return openai_clip_config(
        vision_width=arch.vision_width, vision_layers=arch.vision_layers, patch=arch.patch,
        image_size=arch.image_size, text_width=arch.text_width, text_layers=arch.text_layers,
        text_heads=arch.text_heads, embed_dim=arch.embed_dim, context_length=arch.context_length,
        vocab_size=arch.vocab_size, act=arch.act, vision_heads=arch.vision_heads,
        vision_mlp_ratio=arch.vision_mlp_ratio, text_mlp_ratio=arch.text_mlp_ratio, **overrides,  # type: ignore[arg-type]
    )


# OpenCLIP model_cfg options (open_clip_config.json of a hub folder) and the values this layout needs.
# Keys listed as None accept any value: they do not change the inference model (dropout, output flags,
# tokenizer cleaning, timm options of a trunk that is not used).
_VISION_NEEDS: dict[str, Any] = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
    "scale_attn": False, "scale_fc": False, "timm_model_name": None,
}
_VISION_FREE = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "patch_dropout",
                "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
                "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"}
_TEXT_NEEDS: dict[str, Any] = {
    "hf_tokenizer_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "hf_model_name": None,
}
_TEXT_FREE = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "tokenizer_mode",
              "tokenizer_kwargs", "pad_id", "eos_id", "output_tokens", "hf_model_pretrained", "hf_proj_type",
              "hf_pooler_type"}
_TOP_NEEDS: dict[str, Any] = {"custom_text": False, "init_logit_bias": None, "multimodal_cfg": None}
_TOP_FREE = {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "cast_dtype", "init_logit_scale"}
_NEUTRAL = (None, {}, "default")  # "not set" spellings of the options that must stay off


def _unsupported(cfg: dict[str, Any], needs: dict[str, Any], free: set[str], where: str) -> list[str]:
    out = []
    for key, value in cfg.items():
        if key in free:
            continue
        if key not in needs:
            out.append(f"{where}{key} (unknown option)")
        elif value != needs[key] and not (needs[key] is None and value in _NEUTRAL) and value is not None:
            out.append(f"{where}{key}={value!r}")
    return out


def arch_from_open_clip_config(model_cfg: dict[str, Any], name: str = "open_clip_config.json") -> ClipArch:
    """The :class:`ClipArch` of an OpenCLIP ``model_cfg`` (hub folders' ``open_clip_config.json``).

    Raises:
        ConversionError: The config asks for tower options this layout does not have (a timm trunk, an HF
            text tower, attentional pooling, no ``ln_pre``, layer scale, ...), naming them.
    """
    from vlp_core.convert.registry import ConversionError

    if not isinstance(model_cfg, dict):
        raise ConversionError(f"{name}: model_cfg is not a mapping")
    v, t = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
    bad = (_unsupported(model_cfg, _TOP_NEEDS, _TOP_FREE, "")
           + _unsupported(v, _VISION_NEEDS, _VISION_FREE, "vision_cfg.")
           + _unsupported(t, _TEXT_NEEDS, _TEXT_FREE, "text_cfg."))
    if bad:
        raise ConversionError(f"{name}: OpenCLIP options not supported for the OpenAI tower layout: {', '.join(bad)}")
    width, text_width = int(v.get("width", 768)), int(t.get("width", 512))
    return ClipArch(
        name=name, vision_width=width, vision_layers=int(v.get("layers", 12)),
        vision_heads=width // int(v.get("head_width", 64)), vision_mlp_ratio=float(v.get("mlp_ratio", 4.0)),
        patch=int(v.get("patch_size", 16)), image_size=int(v.get("image_size", 224)), text_width=text_width,
        text_layers=int(t.get("layers", 12)), text_heads=int(t.get("heads", 8)),
        text_mlp_ratio=float(t.get("mlp_ratio", 4.0)), embed_dim=int(model_cfg.get("embed_dim", 512)),
        act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
    )


# ---------------------------------------------------------------------------------------------------------
# choosing the architecture of a checkpoint


@dataclass(frozen=True)
class ClipSizes:
    """What the shapes of an OpenAI-layout state dict say."""

    vision_width: int
    vision_layers: int
    vision_mlp: int
    patch: int
    image_size: int
    text_width: int
    text_layers: int
    text_mlp: int
    embed_dim: int
    context_length: int
    vocab_size: int

    def describe(self) -> str:
        return (f"image width {self.vision_width} x {self.vision_layers} layers, patch {self.patch}, "
                f"{self.image_size}px; text width {self.text_width} x {self.text_layers} layers, "
                f"context {self.context_length}, vocab {self.vocab_size}; embed {self.embed_dim}")


def _fail(layout: str, path: object, what: str) -> ValueError:
    return ConversionError(f"{path}: {layout} checkpoint: {what}")


def _arch_choices(s: ClipSizes) -> list[str]:
    return [a.name for a in CLIP_ARCHS.values() if _arch_mismatch(a, s) == []]


def _arch_mismatch(a: ClipArch, s: ClipSizes) -> list[str]:
    pairs = [("image width", s.vision_width, a.vision_width), ("image layers", s.vision_layers, a.vision_layers),
             ("image MLP width", s.vision_mlp, a.vision_mlp), ("patch", s.patch, a.patch),
             ("image size", s.image_size, a.image_size), ("text width", s.text_width, a.text_width),
             ("text layers", s.text_layers, a.text_layers), ("text MLP width", s.text_mlp, a.text_mlp),
             ("embed dim", s.embed_dim, a.embed_dim), ("context", s.context_length, a.context_length),
             ("vocab", s.vocab_size, a.vocab_size)]
    return [f"{what} {got} ({a.name} has {want})" for what, got, want in pairs if got != want]


def _generic_arch(s: ClipSizes, act: str, name: str, layout: str, path: Path | str) -> ClipArch:
    bad = [f"{w} width {n}" for w, n in (("image", s.vision_width), ("text", s.text_width)) if n % 64]
    if bad:
        raise _fail(layout, path, f"--arch {name} derives heads as width / 64, but {', '.join(bad)} is not a "
                                  f"multiple of 64; pass a named --arch ({', '.join(CLIP_ARCHS)})")
    return ClipArch(
        name=name, vision_width=s.vision_width, vision_layers=s.vision_layers, vision_heads=s.vision_width // 64,
        patch=s.patch, image_size=s.image_size, text_width=s.text_width, text_layers=s.text_layers,
        text_heads=s.text_width // 64, embed_dim=s.embed_dim, act=act,
        vision_mlp_ratio=mlp_ratio_for(s.vision_mlp, s.vision_width),
        text_mlp_ratio=mlp_ratio_for(s.text_mlp, s.text_width), context_length=s.context_length,
        vocab_size=s.vocab_size,
    )


def resolve_arch(
    s: ClipSizes, arch: str | None, *, layout: str, path: Path | str, model_cfg: dict | None = None
) -> ClipArch:
    """The architecture (activation, heads) of a checkpoint with sizes ``s``.

    ``openai`` files are QuickGELU; an OpenCLIP state dict needs ``--arch``, or the ``model_cfg`` of the
    ``open_clip_config.json`` next to it. A named arch is checked against the sizes read from the keys.
    """
    fits = _arch_choices(s)
    if arch is None and model_cfg is not None:
        a = arch_from_open_clip_config(model_cfg, f"{path}/open_clip_config.json")
        wrong = _arch_mismatch(a, s)
        if wrong:
            raise _fail(layout, path, f"the weights do not match open_clip_config.json: {listing(wrong)}")
        if layout == "openai" and a.act != "quick_gelu":
            raise _fail(layout, path, "OpenAI checkpoints use QuickGELU, but open_clip_config.json says GELU")
        return a
    if arch is None:
        if layout == "openai":
            named = [CLIP_ARCHS[n] for n in fits if CLIP_ARCHS[n].act == "quick_gelu"]
            return named[0] if named else _generic_arch(s, "quick_gelu", "quickgelu", layout, path)
        hint = ", ".join(fits) if fits else "none of the named ones; the generic 'quickgelu' or 'gelu'"
        raise _fail(layout, path, f"a state dict does not tell GELU from QuickGELU: pass --arch (for these sizes: "
                                  f"{hint}; names with 'quickgelu' are OpenAI-style, the others GELU)")
    if arch in GENERIC_ARCHS:
        if layout == "openai" and GENERIC_ARCHS[arch] != "quick_gelu":
            raise _fail(layout, path, f"OpenAI checkpoints use QuickGELU, but --arch {arch} is GELU")
        return _generic_arch(s, GENERIC_ARCHS[arch], arch, layout, path)
    if arch not in CLIP_ARCHS:
        raise _fail(layout, path, f"unknown --arch {arch!r}; known: {', '.join([*CLIP_ARCHS, *GENERIC_ARCHS])}")
    a = CLIP_ARCHS[arch]
    wrong = _arch_mismatch(a, s)
    if wrong:
        hint = f"; archs that fit: {', '.join(fits)}" if fits else ""
        raise _fail(layout, path, f"does not match --arch {arch}: {listing(wrong)}{hint}")
    if layout == "openai" and a.act != "quick_gelu":
        raise _fail(layout, path, f"OpenAI checkpoints use QuickGELU, but --arch {arch} is GELU "
                                  f"(use {arch}-quickgelu)")
    return a
