"""Reader for Llip's released checkpoints (``llip_b16_k32.pt``, ``llip_G14_k64.pt`` of facebookresearch/Llip).

Shape legend: K mixture tokens, N patches, p patch size, Wv/Wt image/text tower widths, D embedding dim,
V vocabulary, L context length.

The official model (``CMP``: an OpenCLIP ``CLIP`` whose class token became K mixture tokens, without
``visual.proj``) stores these keys; each maps to vlp's ``TrainStep`` key (``model.`` omitted below):

- ``visual.class_embedding`` [K, Wv] ([Wv] when K = 1) -> ``visual.trunk.reg_token`` [1, K, Wv];
- ``visual.positional_embedding`` [K + N, Wv] -> ``visual.trunk.pos_embed`` [1, K + N, Wv];
- ``visual.conv1.weight`` [Wv, 3, p, p] (no bias) -> ``visual.trunk.patch_embed.proj.weight``;
- ``visual.ln_pre.*`` / ``visual.ln_post.*`` -> ``visual.trunk.norm_pre.*`` / ``visual.trunk.norm.*``;
- ``visual.transformer.resblocks.{i}.`` ``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``, ``ln_2``,
  ``mlp.c_fc``, ``mlp.c_proj`` -> ``visual.trunk.blocks.{i}.`` ``norm1``, ``attn.qkv``, ``attn.proj``,
  ``norm2``, ``mlp.fc1``, ``mlp.fc2`` (OpenAI's fused in-projection is timm's fused qkv, same order);
- ``token_embedding.weight`` [V, Wt], ``positional_embedding`` [L, Wt], ``ln_final.*`` ->
  ``text.token_embedding.weight``, ``text.positional_embedding``, ``text.ln_final.*``;
- ``transformer.resblocks.{i}.*`` -> ``text.blocks.{i}.`` ``ln_1``, ``attn.qkv``, ``attn.proj``, ``ln_2``,
  ``mlp.fc1``, ``mlp.fc2``;
- ``text_projection`` [Wt, D] and ``q_proj`` [Wt, D] (applied as ``g @ W``) -> ``text_projection.weight``
  and ``q_proj.weight`` [D, Wt] (``nn.Linear``: transposed);
- ``k_proj``, ``v_proj`` [K, Wv, D] (``h[k] @ W[k]``) -> ``mixture.k_proj``, ``mixture.v_proj`` as stored;
- ``pred.out_proj`` [D, D] (``z @ W``; a top-level ``out_proj`` in older checkpoints) ->
  ``mixture.out_proj.weight`` (transposed; vlp folds it into the values, the same linear map);
- ``K_norm.*``, ``V_norm.*``, ``Q_norm.*`` (LayerNorm(D), ``use_norm``: H/14, G/14) -> ``mixture.k_norm.*``,
  ``mixture.v_norm.*``, ``q_norm.*``;
- ``logit_scale``, ``logit_bias`` [] -> ``loss.logit_scale``, ``loss.logit_bias`` (no ``model.`` prefix).

Every size comes from the shapes. Four settings do not: the cross-attention temperature tau, the
cross-attention heads, and the head counts of the two towers. When the sizes are one of the paper's models the
matching preset supplies them (and the rest of its recipe). Otherwise the official code's rules apply: 8
cross-attention heads, head width 64 in both towers (80 for a 1280-wide and 104 for a 1664-wide image tower,
OpenCLIP's H and bigG), tau 1 for ViT-L/14 towers and 5 for every other size. ``--arch`` overrides them: a
paper preset name, or ``tau=1,heads=8,vision_heads=16,text_heads=12`` (any subset).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from vlp_core.config import RunConfig
from vlp_core.convert.registry import ConversionError, Converted, Reader, Source, listing, register_reader
from vlp_llip.presets import PAPER_PRESETS, PRESETS, paper_config

__all__ = ["LlipArch", "LAYOUT", "ARCH_KEYS", "LLIP_READER", "detect_llip", "infer_arch", "official_shapes",
           "arch_of", "llip_config", "read_llip"]

log = logging.getLogger("vlp")

LAYOUT = "llip"
# The settings that the shapes do not show, accepted by ``--arch key=value,...``.
ARCH_KEYS = ("tau", "heads", "vision_heads", "text_heads")
_MARKERS = ("visual.class_embedding", "k_proj", "v_proj", "q_proj")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")
# Per-block tensors: official name -> (vlp name in the image tower, in the text tower).
_BLOCK_KEYS = {
    "ln_1.weight": ("norm1.weight", "ln_1.weight"),
    "ln_1.bias": ("norm1.bias", "ln_1.bias"),
    "attn.in_proj_weight": ("attn.qkv.weight", "attn.qkv.weight"),
    "attn.in_proj_bias": ("attn.qkv.bias", "attn.qkv.bias"),
    "attn.out_proj.weight": ("attn.proj.weight", "attn.proj.weight"),
    "attn.out_proj.bias": ("attn.proj.bias", "attn.proj.bias"),
    "ln_2.weight": ("norm2.weight", "ln_2.weight"),
    "ln_2.bias": ("norm2.bias", "ln_2.bias"),
    "mlp.c_fc.weight": ("mlp.fc1.weight", "mlp.fc1.weight"),
    "mlp.c_fc.bias": ("mlp.fc1.bias", "mlp.fc1.bias"),
    "mlp.c_proj.weight": ("mlp.fc2.weight", "mlp.fc2.weight"),
    "mlp.c_proj.bias": ("mlp.fc2.bias", "mlp.fc2.bias"),
}
# Image-tower head width of OpenCLIP's wide towers (H/14: 1280 / 80, bigG/14: 1664 / 104); 64 otherwise.
_HEAD_WIDTH = {1280: 80, 1664: 104}


@dataclass(frozen=True)
class LlipArch:
    """Everything the shapes of an official Llip state dict tell (MLP sizes are hidden widths)."""

    tokens: int
    vision_width: int
    vision_layers: int
    patch: int
    image_size: int
    vision_mlp: int
    vocab_size: int
    context_length: int
    text_width: int
    text_layers: int
    text_mlp: int
    embed_dim: int
    use_norm: bool


def detect_llip(source: Source) -> bool:
    """Official Llip keys: ``visual.class_embedding`` and the top-level ``k_proj``, ``v_proj``, ``q_proj``."""
    return all(k in source.state_dict for k in _MARKERS)


def _tensor(sd: dict[str, Tensor], key: str, ndim: int, where: str) -> Tensor:
    if key not in sd:
        raise ConversionError(f"{where}: missing key {key!r} of Llip's layout")
    t = sd[key]
    if t.ndim != ndim:
        raise ConversionError(f"{where}: {key} has shape {list(t.shape)}, expected {ndim} dimensions")
    return t


def _depth(sd: dict[str, Tensor], visual: bool) -> int:
    blocks = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and bool(m.group(1)) == visual}
    return max(blocks) + 1 if blocks else 0


def infer_arch(sd: dict[str, Tensor], where: str) -> LlipArch:
    """The sizes of an official Llip state dict (already normalised by :func:`_normalise`)."""
    tokens, width = _tensor(sd, "visual.class_embedding", 2, where).shape
    conv = _tensor(sd, "visual.conv1.weight", 4, where)
    patch = int(conv.shape[-1])
    positions = int(_tensor(sd, "visual.positional_embedding", 2, where).shape[0])
    grid = math.isqrt(max(positions - tokens, 0))
    if positions <= tokens or grid * grid != positions - tokens:
        raise ConversionError(
            f"{where}: visual.positional_embedding has {positions} rows, not K={tokens} mixture tokens plus a "
            "square grid of patches")
    vision_layers, text_layers = _depth(sd, True), _depth(sd, False)
    if not vision_layers or not text_layers:
        tower = "visual.transformer.resblocks" if not vision_layers else "transformer.resblocks"
        raise ConversionError(f"{where}: no {tower}.* keys: not a complete Llip checkpoint")
    vocab, text_width = _tensor(sd, "token_embedding.weight", 2, where).shape
    return LlipArch(
        tokens=int(tokens), vision_width=int(width), vision_layers=vision_layers, patch=patch,
        image_size=grid * patch,
        vision_mlp=int(_tensor(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", 2, where).shape[0]),
        vocab_size=int(vocab), context_length=int(_tensor(sd, "positional_embedding", 2, where).shape[0]),
        text_width=int(text_width), text_layers=text_layers,
        text_mlp=int(_tensor(sd, "transformer.resblocks.0.mlp.c_fc.weight", 2, where).shape[0]),
        embed_dim=int(_tensor(sd, "text_projection", 2, where).shape[1]), use_norm="K_norm.weight" in sd,
    )


def _block_shapes(prefix: str, layers: int, width: int, mlp: int) -> dict[str, tuple[int, ...]]:
    per = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
           "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
           "ln_2.weight": (width,), "ln_2.bias": (width,), "mlp.c_fc.weight": (mlp, width), "mlp.c_fc.bias": (mlp,),
           "mlp.c_proj.weight": (width, mlp), "mlp.c_proj.bias": (width,)}
    return {f"{prefix}{i}.{k}": s for i in range(layers) for k, s in per.items()}


def official_shapes(a: LlipArch) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict of architecture ``a``, with its shape."""
    Wv, Wt, D, K = a.vision_width, a.text_width, a.embed_dim, a.tokens
    grid = a.image_size // a.patch
    shapes: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (K, Wv), "visual.positional_embedding": (K + grid * grid, Wv),
        "visual.conv1.weight": (Wv, 3, a.patch, a.patch),
        "visual.ln_pre.weight": (Wv,), "visual.ln_pre.bias": (Wv,),
        "visual.ln_post.weight": (Wv,), "visual.ln_post.bias": (Wv,),
        **_block_shapes("visual.transformer.resblocks.", a.vision_layers, Wv, a.vision_mlp),
        "token_embedding.weight": (a.vocab_size, Wt), "positional_embedding": (a.context_length, Wt),
        **_block_shapes("transformer.resblocks.", a.text_layers, Wt, a.text_mlp),
        "ln_final.weight": (Wt,), "ln_final.bias": (Wt,),
        "text_projection": (Wt, D), "q_proj": (Wt, D), "k_proj": (K, Wv, D), "v_proj": (K, Wv, D),
        "pred.out_proj": (D, D), "logit_scale": (), "logit_bias": (),
    }
    if a.use_norm:
        for name in ("K_norm", "Q_norm", "V_norm"):
            shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (D,)
    return shapes


def _normalise(sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """What the official evaluation accepts too: a top-level ``out_proj``, a 1-D class embedding (K = 1)."""
    sd = dict(sd)
    if "out_proj" in sd:
        if "pred.out_proj" in sd:
            raise ConversionError(f"{where}: both out_proj and pred.out_proj are present")
        sd["pred.out_proj"] = sd.pop("out_proj")
    if "visual.class_embedding" in sd and sd["visual.class_embedding"].ndim == 1:
        sd["visual.class_embedding"] = sd["visual.class_embedding"][None]
    sd.pop("attn_mask", None)  # the text tower's causal mask (a buffer in some OpenCLIP versions): no weights
    return sd


def _check_shapes(sd: dict[str, Tensor], a: LlipArch, where: str) -> None:
    expected = official_shapes(a)
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = [f"{k} {list(sd[k].shape)} (expected {list(expected[k])})" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    if "visual.proj" in unexpected:
        raise ConversionError(f"{where}: visual.proj is present: Llip's image tower has no projection "
                              "(a CLIP checkpoint? use the openai/open_clip layouts)")
    for what, keys in (("missing keys", missing), ("wrong shapes", wrong), ("unexpected keys", unexpected)):
        if keys:
            raise ConversionError(f"{where}: not Llip's layout for K={a.tokens}, width {a.vision_width}, D="
                                  f"{a.embed_dim}: {what}: {listing(keys)}")


def _parse_arch(arch: str | None) -> tuple[str | None, dict[str, float]]:
    """``--arch``: a paper preset name, or ``key=value`` settings (see :data:`ARCH_KEYS`), comma-separated."""
    if not arch:
        return None, {}
    if arch in PAPER_PRESETS:
        return arch, {}
    settings: dict[str, float] = {}
    for item in arch.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ARCH_KEYS:
            raise ConversionError(
                f"--arch {arch!r} for Llip: use one of {', '.join(PAPER_PRESETS)}, or key=value settings among "
                f"{', '.join(ARCH_KEYS)} (e.g. tau=1,heads=8)")
        try:
            settings[key] = float(value) if key == "tau" else int(value)
        except ValueError:
            raise ConversionError(f"--arch {item!r}: {key} must be a number") from None
    return None, settings


def arch_of(cfg: RunConfig) -> LlipArch:
    """The :class:`LlipArch` of a Llip run config (what its model's official state dict would show)."""
    v, t = cfg.model.vision, cfg.model.text
    return LlipArch(
        tokens=v.extra_tokens, vision_width=v.width, vision_layers=v.depth, patch=v.patch_size,
        image_size=v.image_size, vision_mlp=int(v.width * v.mlp_ratio), vocab_size=t.vocab_size,
        context_length=t.context_length, text_width=t.width, text_layers=t.depth,
        text_mlp=int(round(t.width * t.mlp_ratio)), embed_dim=cfg.model.embed_dim, use_norm=cfg.loss.use_norm)


def _heads(width: int, head_width: int, what: str, where: str) -> int:
    if width % head_width:
        raise ConversionError(f"{where}: cannot tell the {what} heads of width {width} (not a multiple of "
                              f"{head_width}): pass --arch {what}_heads=N")
    return width // head_width


def _generic_config(a: LlipArch, settings: dict[str, float], where: str) -> RunConfig:
    """The official code's rules for sizes that are none of the paper's models (module docstring)."""
    from vlp_core.convert.archs import mlp_ratio_for

    vision_heads = settings.get("vision_heads") or _heads(a.vision_width, _HEAD_WIDTH.get(a.vision_width, 64),
                                                          "vision", where)
    text_heads = settings.get("text_heads") or _heads(a.text_width, 64, "text", where)
    is_l14 = (a.vision_width, a.vision_layers, a.patch) == (1024, 24, 14)
    return paper_config(
        vision_width=a.vision_width, vision_layers=a.vision_layers, vision_heads=int(vision_heads), patch=a.patch,
        tokens=a.tokens, embed_dim=a.embed_dim, text_width=a.text_width, text_layers=a.text_layers,
        text_heads=int(text_heads), tau=1.0 if is_l14 else 5.0, use_norm=a.use_norm,
        vision_mlp_ratio=mlp_ratio_for(a.vision_mlp, a.vision_width),
        text_mlp_ratio=mlp_ratio_for(a.text_mlp, a.text_width), image_size=a.image_size,
        context_length=a.context_length, vocab_size=a.vocab_size,
    )


def llip_config(a: LlipArch, arch: str | None = None, where: str = "llip") -> RunConfig:
    """The run config of architecture ``a``: the matching paper preset, else the official rules (module doc).

    Args:
        a: The sizes (:func:`infer_arch`).
        arch: ``--arch``: None, a paper preset name, or ``key=value`` settings (:data:`ARCH_KEYS`).
        where: The source, for messages.
    """
    preset, settings = _parse_arch(arch)
    matches = [n for n in PAPER_PRESETS if arch_of(PRESETS[n]()) == a]
    if preset is not None and preset not in matches:
        raise ConversionError(f"{where}: the checkpoint's sizes are not those of --arch {preset}: {a}")
    preset = preset or (matches[0] if matches else None)
    cfg = PRESETS[preset]() if preset is not None else _generic_config(a, settings, where)
    cfg.method, cfg.preset = "llip", preset or "custom"
    v, t, llip = cfg.model.vision, cfg.model.text, cfg.loss
    v.heads = int(settings.get("vision_heads", v.heads))
    t.heads = int(settings.get("text_heads", t.heads))
    llip.tau = float(settings.get("tau", llip.tau))
    llip.heads = int(settings.get("heads", llip.heads))
    for what, width, heads in (("vision", v.width, v.heads), ("text", t.width, t.heads),
                               ("cross-attention", a.embed_dim, llip.heads)):
        if heads <= 0 or width % heads:
            raise ConversionError(f"{where}: {what} heads {heads} do not divide the width {width}")
    return cfg


def _map_keys(sd: dict[str, Tensor], a: LlipArch) -> dict[str, Tensor]:
    """Official keys -> vlp ``TrainStep`` keys (the table of the module docstring)."""
    out: dict[str, Tensor] = {}
    vis, txt = "model.visual.trunk.", "model.text."
    direct = {
        "visual.class_embedding": (vis + "reg_token", lambda x: x[None]),
        "visual.positional_embedding": (vis + "pos_embed", lambda x: x[None]),
        "visual.conv1.weight": (vis + "patch_embed.proj.weight", None),
        "visual.ln_pre.weight": (vis + "norm_pre.weight", None), "visual.ln_pre.bias": (vis + "norm_pre.bias", None),
        "visual.ln_post.weight": (vis + "norm.weight", None), "visual.ln_post.bias": (vis + "norm.bias", None),
        "token_embedding.weight": (txt + "token_embedding.weight", None),
        "positional_embedding": (txt + "positional_embedding", None),
        "ln_final.weight": (txt + "ln_final.weight", None), "ln_final.bias": (txt + "ln_final.bias", None),
        "text_projection": ("model.text_projection.weight", torch.t),
        "q_proj": ("model.q_proj.weight", torch.t),
        "k_proj": ("model.mixture.k_proj", None), "v_proj": ("model.mixture.v_proj", None),
        "pred.out_proj": ("model.mixture.out_proj.weight", torch.t),
        "logit_scale": ("loss.logit_scale", None), "logit_bias": ("loss.logit_bias", None),
    }
    norms = {"K_norm": "model.mixture.k_norm", "V_norm": "model.mixture.v_norm", "Q_norm": "model.q_norm"}
    for key, tensor in sd.items():
        if key in direct:
            name, fn = direct[key]
            out[name] = (fn(tensor) if fn is not None else tensor).contiguous()
        elif (m := _BLOCK.match(key)) is not None:
            i, rest = m.group(2), key[m.end():]
            image_name, text_name = _BLOCK_KEYS[rest]
            out[f"{vis}blocks.{i}.{image_name}" if m.group(1) else f"{txt}blocks.{i}.{text_name}"] = tensor
        else:
            norm, _, param = key.partition(".")
            out[f"{norms[norm]}.{param}"] = tensor
    return out


def read_llip(source: Source, arch: str | None = None) -> Converted:
    """Convert an official Llip state dict into vlp's layout (``model.*`` / ``loss.*`` and the run config).

    Raises:
        ConversionError: Missing, unexpected or mis-shaped keys, or sizes that do not make a Llip model
            (the message names the file and the keys).
    """
    where = str(source.path)
    sd = _normalise(source.state_dict, where)
    a = infer_arch(sd, where)
    _check_shapes(sd, a, where)
    cfg = llip_config(a, arch, where)
    log.info("%s: Llip %s, K=%d, D=%d, tau %g, %d cross-attention heads%s", where, cfg.preset, a.tokens,
             a.embed_dim, cfg.loss.tau, cfg.loss.heads, ", LayerNorm on Q/K/V" if a.use_norm else "")
    return Converted(state_dict=_map_keys(sd, a), config=cfg, layout=LAYOUT)


LLIP_READER = register_reader(Reader(
    name=LAYOUT, priority=30, detect=detect_llip, read=read_llip,
    description="Llip's released checkpoints (facebookresearch/Llip, e.g. llip_b16_k32.pt): K mixture tokens in "
                "visual.class_embedding, k_proj/v_proj/q_proj; sizes from the keys, tau/heads from the paper "
                "preset (--arch tau=..,heads=..)",
))
