"""OpenAI CLIP and OpenCLIP checkpoints: readers ``openai`` / ``open_clip`` and the writer ``open_clip``.

Both layouts use OpenAI's key names (``visual.conv1.weight``, ``visual.class_embedding``,
``visual.positional_embedding``, ``visual.ln_pre``, ``visual.transformer.resblocks.{i}.*``, ``visual.ln_post``,
``visual.proj``, ``token_embedding``, ``positional_embedding``, ``transformer.resblocks.{i}.*``, ``ln_final``,
``text_projection``, ``logit_scale``). OpenAI's files (TorchScript archives, or the state dict of
``clip.load(jit=False)``) also hold the ``input_resolution`` / ``context_length`` / ``vocab_size`` buffers;
OpenCLIP's may hold ``attn_mask``. Every size is inferred from the shapes, as OpenCLIP's
``build_model_from_openai_state_dict`` does; the activation and head counts come from ``--arch`` (see
:mod:`vlp_core.convert.archs`).

vlp keys (see the module docstring of :mod:`vlp_core.convert.registry`): the image trunk is a timm
``VisionTransformer`` (timm's ``_convert_openai_clip`` maps the visual keys), the text tower a
``CausalTextTransformer``; ``visual.proj`` [Wv, E] and ``text_projection`` [Wt, E] become the bias-free
``model.image_proj.weight`` [E, Wv] / ``model.text_proj.weight`` [E, Wt]; ``logit_scale`` becomes
``loss.loss.logit_scale``.

Legend: W width (Wv image, Wt text), E embed dim, F MLP hidden width, G patch grid side, L context, V vocab.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from vlp_core.config import RunConfig
from vlp_core.convert.archs import CLIP_ARCHS, ClipSizes, arch_config, resolve_arch
from vlp_core.convert.registry import (
    ConversionError,
    Converted,
    Reader,
    Source,
    Writer,
    key_problems,
    listing,
    register_reader,
    register_writer,
)

__all__ = [
    "ClipSizes",
    "infer_sizes",
    "openai_key_shapes",
    "openai_to_vlp",
    "vlp_to_openai",
    "read_openai",
    "read_open_clip",
    "write_open_clip",
    "OPENAI_BUFFERS",
]

log = logging.getLogger("vlp")

OPENAI_BUFFERS = ("input_resolution", "context_length", "vocab_size")
_IGNORED = re.compile(r"^(attn_mask|.*\.attn_mask)$")  # OpenCLIP's causal mask (a buffer in old versions)
_VISUAL_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.")
_TEXT_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.")
# OpenAI block key suffix <-> vlp (timm / CausalTextTransformer) block key suffix.
_BLOCK_KEYS = {
    "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TIMM_BLOCK = {"ln_1.": "norm1.", "ln_2.": "norm2."}  # timm names the block norms norm1/norm2


def _fail(layout: str, path: Path | str, what: str) -> ConversionError:
    return ConversionError(f"{path}: {layout} checkpoint: {what}")


def _get(sd: dict[str, Tensor], key: str, ndim: int, layout: str, path: Path | str) -> Tensor:
    if key not in sd:
        raise _fail(layout, path, f"missing key {key} (needed to infer the model size)")
    if sd[key].ndim != ndim:
        raise _fail(layout, path, f"shape mismatch: {key} has shape {tuple(sd[key].shape)}, expected {ndim} dims")
    return sd[key]


def _layers(sd: dict[str, Tensor], pattern: re.Pattern[str]) -> int:
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def infer_sizes(sd: dict[str, Tensor], *, layout: str, path: Path | str) -> ClipSizes:
    """Every size of an OpenAI-layout CLIP from its shapes (OpenCLIP's ``build_model_from_openai_state_dict``).

    Raises:
        ConversionError: A key the sizes are read from is missing or has the wrong number of dims, the
            position table is not a square grid plus the class token, or a tower has no blocks.
    """
    conv_WCpp = _get(sd, "visual.conv1.weight", 4, layout, path)
    pos_TW = _get(sd, "visual.positional_embedding", 2, layout, path)
    patch = int(conv_WCpp.shape[-1])
    grid = math.isqrt(max(int(pos_TW.shape[0]) - 1, 0))
    if grid * grid + 1 != pos_TW.shape[0]:
        raise _fail(layout, path, f"visual.positional_embedding has {pos_TW.shape[0]} rows, not 1 + a square grid")
    vision_layers, text_layers = _layers(sd, _VISUAL_BLOCK), _layers(sd, _TEXT_BLOCK)
    if not vision_layers or not text_layers:
        raise _fail(layout, path, "no visual.transformer.resblocks.* or transformer.resblocks.* blocks")
    return ClipSizes(
        vision_width=int(conv_WCpp.shape[0]),
        vision_layers=vision_layers,
        vision_mlp=int(_get(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2, layout, path).shape[0]),
        patch=patch,
        image_size=grid * patch,
        text_width=int(_get(sd, "ln_final.weight", 1, layout, path).shape[0]),
        text_layers=text_layers,
        text_mlp=int(_get(sd, "transformer.resblocks.0.mlp.c_fc.weight", 2, layout, path).shape[0]),
        embed_dim=int(_get(sd, "text_projection", 2, layout, path).shape[1]),
        context_length=int(_get(sd, "positional_embedding", 2, layout, path).shape[0]),
        vocab_size=int(_get(sd, "token_embedding.weight", 2, layout, path).shape[0]),
    )


def _block_shapes(prefix: str, W: int, F: int) -> dict[str, tuple[int, ...]]:
    shapes = {"ln_1.weight": (W,), "ln_1.bias": (W,), "attn.in_proj_weight": (3 * W, W), "attn.in_proj_bias": (3 * W,),
              "attn.out_proj.weight": (W, W), "attn.out_proj.bias": (W,), "ln_2.weight": (W,), "ln_2.bias": (W,),
              "mlp.c_fc.weight": (F, W), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (W, F), "mlp.c_proj.bias": (W,)}
    return {prefix + k: v for k, v in shapes.items()}


def openai_key_shapes(s: ClipSizes) -> dict[str, tuple[int, ...]]:
    """Every OpenAI-layout key (buffers excluded) with its shape, for the sizes ``s``."""
    Wv, Wt, E = s.vision_width, s.text_width, s.embed_dim
    G = s.image_size // s.patch
    out: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (Wv,), "visual.positional_embedding": (G * G + 1, Wv),
        "visual.conv1.weight": (Wv, 3, s.patch, s.patch), "visual.ln_pre.weight": (Wv,), "visual.ln_pre.bias": (Wv,),
        "visual.ln_post.weight": (Wv,), "visual.ln_post.bias": (Wv,), "visual.proj": (Wv, E),
        "token_embedding.weight": (s.vocab_size, Wt), "positional_embedding": (s.context_length, Wt),
        "ln_final.weight": (Wt,), "ln_final.bias": (Wt,), "text_projection": (Wt, E), "logit_scale": (),
    }
    for i in range(s.vision_layers):
        out.update(_block_shapes(f"visual.transformer.resblocks.{i}.", Wv, s.vision_mlp))
    for i in range(s.text_layers):
        out.update(_block_shapes(f"transformer.resblocks.{i}.", Wt, s.text_mlp))
    return out


def check_openai_keys(sd: dict[str, Tensor], s: ClipSizes, *, layout: str, path: Path | str) -> None:
    """Missing, unexpected and wrongly shaped keys of ``sd`` against the sizes ``s``, all named in one line."""
    expected = openai_key_shapes(s)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k] and not (k == "logit_scale" and sd[k].numel() == 1)]
    problems = key_problems(missing, unexpected, wrong)
    if problems:
        raise _fail(layout, path, f"{problems} [sizes read from the keys: {s.describe()}]")


def _unsupported_towers(sd: dict[str, Tensor]) -> str:
    """Why an OpenAI-like state dict is not the ViT/causal-text layout, or ''."""
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        return "a ResNet image tower (OpenAI RN50 family); only ViT image towers are supported"
    if any(k.startswith("visual.trunk.") for k in sd):
        return "a timm image trunk (visual.trunk.*); only OpenAI-layout ViT image towers are supported here"
    if any(k.startswith("text.") for k in sd):
        return "a separate text tower (text.*, OpenCLIP CustomTextCLIP); only OpenAI-layout text towers are supported"
    return ""


# ---------------------------------------------------------------------------------------------------------
# key mapping


def openai_to_vlp(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenAI-layout keys (already checked) -> vlp ``TrainStep`` keys (a pure renaming plus reshapes)."""
    from timm.models.vision_transformer import _convert_openai_clip

    visual = {k: v for k, v in sd.items() if k.startswith("visual.")}
    out: dict[str, Tensor] = {}
    # timm maps visual.* to its VisionTransformer keys; ``model`` is not used by it. ``visual.proj`` comes back
    # as a classifier head (``head.weight`` = proj.T [E, Wv], ``head.bias`` = zeros): it is our image_proj.
    for k, v in _convert_openai_clip(visual, None, prefix="visual.").items():  # type: ignore[arg-type]
        if k == "head.weight":
            out["model.image_proj.weight"] = v
        elif k != "head.bias":
            out[f"model.visual.trunk.{k}"] = v
    for k, v in sd.items():
        if m := _TEXT_BLOCK.match(k):
            out[f"model.text.blocks.{m.group(1)}.{_BLOCK_KEYS[k[m.end():]]}"] = v
        elif k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"):
            out[f"model.text.{k}"] = v
    out["model.text_proj.weight"] = sd["text_projection"].t()
    out["loss.loss.logit_scale"] = sd["logit_scale"].reshape(())
    return out


def _vlp_visual_key(key: str) -> str | None:
    """``model.visual.trunk.<timm key>`` -> OpenAI ``visual.*`` key (None if not one of the layout's)."""
    k = key.removeprefix("model.visual.trunk.")
    fixed = {"cls_token": "visual.class_embedding", "pos_embed": "visual.positional_embedding",
             "patch_embed.proj.weight": "visual.conv1.weight", "norm_pre.weight": "visual.ln_pre.weight",
             "norm_pre.bias": "visual.ln_pre.bias", "norm.weight": "visual.ln_post.weight",
             "norm.bias": "visual.ln_post.bias"}
    if k in fixed:
        return fixed[k]
    m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
    if not m:
        return None
    rest = m.group(2)
    for openai_suffix, vlp_suffix in _BLOCK_KEYS.items():
        timm_suffix = vlp_suffix
        for a, b in _TIMM_BLOCK.items():
            timm_suffix = timm_suffix.replace(a, b)
        if rest == timm_suffix:
            return f"visual.transformer.resblocks.{m.group(1)}.{openai_suffix}"
    return None


def vlp_to_openai(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """vlp ``TrainStep`` keys -> OpenAI-layout keys; returns ``(state_dict, vlp keys with no OpenAI name)``."""
    inverse_block = {v: k for k, v in _BLOCK_KEYS.items()}
    out: dict[str, Tensor] = {}
    left: list[str] = []
    for key, v in sd.items():
        if key.startswith("model.visual.trunk."):
            name = _vlp_visual_key(key)
            if name is None:
                left.append(key)
            elif name == "visual.class_embedding":
                out[name] = v.reshape(-1)
            elif name == "visual.positional_embedding":
                out[name] = v.reshape(v.shape[-2], v.shape[-1])
            else:
                out[name] = v
        elif m := re.match(r"^model\.text\.blocks\.(\d+)\.(.+)$", key):
            if m.group(2) in inverse_block:
                out[f"transformer.resblocks.{m.group(1)}.{inverse_block[m.group(2)]}"] = v
            else:
                left.append(key)
        elif key in ("model.text.token_embedding.weight", "model.text.positional_embedding",
                     "model.text.ln_final.weight", "model.text.ln_final.bias"):
            out[key.removeprefix("model.text.")] = v
        elif key == "model.image_proj.weight":
            out["visual.proj"] = v.t()
        elif key == "model.text_proj.weight":
            out["text_projection"] = v.t()
        elif key == "loss.loss.logit_scale":
            out["logit_scale"] = v.reshape(())
        elif key == "loss.loss.logit_bias":
            out["logit_bias"] = v.reshape(())
        else:
            left.append(key)
    return out, left


# ---------------------------------------------------------------------------------------------------------
# readers


def _check_openai_buffers(sd: dict[str, Tensor], s: ClipSizes, path: Path | str) -> None:
    said = {k: int(sd[k].item()) for k in OPENAI_BUFFERS if k in sd and sd[k].numel() == 1}
    seen = {"input_resolution": s.image_size, "context_length": s.context_length, "vocab_size": s.vocab_size}
    wrong = [f"{k}={v} but the weights say {seen[k]}" for k, v in said.items() if v != seen[k]]
    if wrong:
        raise _fail("openai", path, "; ".join(wrong))


def _read(source: Source, arch: str | None, layout: str) -> Converted:
    path = source.path
    why = _unsupported_towers(source.state_dict)
    if why:
        raise _fail(layout, path, why)
    sd = {k: v for k, v in source.state_dict.items() if not _IGNORED.match(k)}
    sizes = infer_sizes(sd, layout=layout, path=path)
    if layout == "openai":
        _check_openai_buffers(sd, sizes, path)
    sd = {k: v for k, v in sd.items() if k not in OPENAI_BUFFERS}
    check_openai_keys(sd, sizes, layout=layout, path=path)
    oc_config = source.meta.get("open_clip_config")
    oc_config = oc_config if isinstance(oc_config, dict) else {}
    a = resolve_arch(sizes, arch, layout=layout, path=path, model_cfg=oc_config.get("model_cfg"))
    scale = float(sd["logit_scale"].float().reshape(()))
    if not math.isfinite(scale):
        raise _fail(layout, path, f"logit_scale is {scale}")
    cfg = arch_config(a, max_logit_scale=max(100.0, math.exp(min(scale, 50.0)) * (1 + 1e-6)))
    _apply_preprocess(cfg, oc_config.get("preprocess_cfg"))
    log.info("%s: %s checkpoint, arch %s (%s, %s)", path, layout, a.name, a.act, sizes.describe())
    return Converted(state_dict=openai_to_vlp(sd), config=cfg, layout=layout)


def _apply_preprocess(cfg: RunConfig, preprocess: object) -> None:
    """Mean / std / interpolation of an ``open_clip_config.json`` (CLIP's values when absent)."""
    if not isinstance(preprocess, dict):
        return
    v = cfg.model.vision
    if isinstance(preprocess.get("mean"), list) and len(preprocess["mean"]) == 3:
        v.image_mean = [float(x) for x in preprocess["mean"]]
    if isinstance(preprocess.get("std"), list) and len(preprocess["std"]) == 3:
        v.image_std = [float(x) for x in preprocess["std"]]
    if preprocess.get("interpolation") in ("bilinear", "bicubic"):
        v.interpolation = preprocess["interpolation"]


def _openai_keys_present(source: Source) -> bool:
    sd = source.state_dict
    return any(k.startswith("visual.") for k in sd) and (
        "token_embedding.weight" in sd or any(k.startswith("transformer.resblocks.") for k in sd)
    )


def _detect_openai(source: Source) -> bool:
    return _openai_keys_present(source) and (bool(source.meta.get("jit")) or
                                             any(k in source.state_dict for k in OPENAI_BUFFERS))


def read_openai(source: Source, arch: str | None = None) -> Converted:
    """OpenAI's CLIP (TorchScript archive or ``clip.load(jit=False)`` state dict): QuickGELU."""
    return _read(source, arch, "openai")


def read_open_clip(source: Source, arch: str | None = None) -> Converted:
    """An OpenCLIP state dict with OpenAI-layout towers; ``arch`` (``--arch``) is required."""
    return _read(source, arch, "open_clip")


# ---------------------------------------------------------------------------------------------------------
# writer


def _writer_check(cfg: RunConfig) -> list[str]:
    """Why ``cfg`` has no OpenAI/OpenCLIP tower layout ([] when it has)."""
    v, t, m = cfg.model.vision, cfg.model.text, cfg.model
    checks = [
        (not v.timm_name, f"vision.timm_name={v.timm_name!r} (needs the explicit ViT)"),
        (v.pre_norm, "vision.pre_norm=False (OpenAI towers have ln_pre)"),
        (v.class_token and v.pool == "token", f"vision pool={v.pool!r}/class_token={v.class_token} (needs 'token')"),
        (v.extra_tokens == 0, f"vision.extra_tokens={v.extra_tokens}"),
        (v.stem == "patch", f"vision.stem={v.stem!r}"),
        (t.kind == "clip" and t.causal and t.pool == "eot", f"text kind={t.kind!r}/causal={t.causal}/pool={t.pool!r}"),
        (m.image_proj == "linear" and m.text_proj == "linear",
         f"projections {m.image_proj!r}/{m.text_proj!r} (needs bias-free 'linear')"),
        (v.act == t.act and v.act in ("gelu", "quick_gelu"), f"activations {v.act!r}/{t.act!r}"),
        (v.norm_eps == 1e-5 and t.norm_eps == 1e-5, f"LayerNorm eps {v.norm_eps}/{t.norm_eps} (OpenCLIP: 1e-5)"),
    ]
    return [why for ok, why in checks if not ok]


def open_clip_model_cfg(cfg: RunConfig) -> dict:
    """OpenCLIP's ``model_cfg`` (``CLIP(**model_cfg)``) for a config that passes :func:`_writer_check`."""
    v, t = cfg.model.vision, cfg.model.text
    vision = {"image_size": v.image_size, "layers": v.depth, "width": v.width, "head_width": v.width // v.heads,
              "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size or 49408, "width": t.width,
            "heads": t.heads, "layers": t.depth, "mlp_ratio": t.mlp_ratio}
    out = {"embed_dim": cfg.model.embed_dim, "vision_cfg": vision, "text_cfg": text}
    if v.act == "quick_gelu":
        out["quick_gelu"] = True
    return out


def _matching_names(cfg: RunConfig) -> list[str]:
    v, t = cfg.model.vision, cfg.model.text
    return [a.name for a in CLIP_ARCHS.values()
            if (a.vision_width, a.vision_layers, a.vision_heads, a.patch, a.image_size, a.text_width, a.text_layers,
                a.text_heads, a.embed_dim, a.context_length, a.act, a.vision_mlp, a.text_mlp)
            == (v.width, v.depth, v.heads, v.patch_size, v.image_size, t.width, t.depth, t.heads,
                cfg.model.embed_dim, t.context_length, v.act, int(v.width * v.mlp_ratio), int(t.width * t.mlp_ratio))]


def to_open_clip(converted: Converted) -> dict[str, Tensor]:
    """The OpenCLIP/OpenAI-layout state dict of a vlp CLIP; ConversionError for other model layouts."""
    why = _writer_check(converted.config)
    if why:
        raise ConversionError(f"cannot write open_clip from a {converted.layout} model: {listing(why)}")
    sd, left = vlp_to_openai(converted.state_dict)
    if left:
        raise ConversionError(f"cannot write open_clip from a {converted.layout} model: keys with no OpenCLIP "
                              f"name: {listing(left)}")
    sizes = infer_sizes(sd, layout=converted.layout, path="model")
    check_openai_keys({k: v for k, v in sd.items() if k != "logit_bias"}, sizes, layout=converted.layout,
                      path="model")
    return {k: v.detach().contiguous() for k, v in sd.items()}


def write_open_clip(converted: Converted, out: Path) -> None:
    """Write an OpenCLIP state dict: ``.safetensors`` (OpenCLIP's model_cfg kept in the metadata) or ``.pt``."""
    from vlp_core.convert.vlp_format import atomic_write, unshared

    out = Path(out)
    if out.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise ConversionError(f"--to open_clip writes .safetensors or .pt/.pth/.bin, not {out.name}")
    sd = unshared(to_open_clip(converted))
    names = _matching_names(converted.config)
    model_cfg = open_clip_model_cfg(converted.config)
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt", "open_clip_model_cfg": json.dumps(model_cfg), "open_clip_names": ",".join(names)}
        atomic_write(out, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    else:
        atomic_write(out, lambda tmp: torch.save(sd, tmp))
    if names:
        log.info("wrote %s: open_clip.create_model(%r) loads it", out, names[0])
    else:
        log.info("wrote %s: custom sizes, build open_clip.model.CLIP(**%s)", out, json.dumps(model_cfg))


register_reader(Reader(
    name="openai", priority=20, detect=_detect_openai, read=read_openai,
    description="OpenAI CLIP ViT (TorchScript .pt archive, or its state dict with input_resolution/context_length"
                "/vocab_size): QuickGELU; sizes from the keys",
))
register_reader(Reader(
    name="open_clip", priority=10, detect=_openai_keys_present, read=read_open_clip,
    description="OpenCLIP ViT CLIP state dict (OpenAI key names; .safetensors/.bin/.pt): needs --arch, e.g. "
                "ViT-B-32 (GELU) or ViT-B-32-quickgelu, unless its folder has open_clip_config.json",
))
register_writer(Writer(
    name="open_clip", write=write_open_clip,
    description="OpenCLIP state dict (.safetensors or .pt) for open_clip.create_model(name).load_state_dict()",
))
