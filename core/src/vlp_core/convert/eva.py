"""EVA02 / EVA-CLIP image towers (LLM2CLIP's vision towers): the reader ``timm-eva``.

Accepted layouts, all renamed by timm's own ``timm.models.eva.checkpoint_filter_fn``:

- a timm ``Eva`` state dict (``cls_token``, ``blocks.{i}.attn.q_proj``, ``mlp.fc1_g``, ..., optional ``head``);
- EVA-CLIP's own visual layout under ``visual.`` (``attn.q_bias``/``v_bias``, ``attn.inner_attn_ln``,
  ``mlp.w1/w2/w3/ffn_ln``, ``rope.*`` buffers, ``head``);
- OpenCLIP's EVA02 models (``visual.trunk.*``, the trunk's ``head`` is the projection).

EVA-CLIP and OpenCLIP files may also hold the OpenCLIP text tower (``text.token_embedding``,
``text.transformer.resblocks.{i}.*``, ``text.ln_final``, ``text.text_projection``) and ``logit_scale``: they
become a complete vlp CLIP (causal text, first-EOT pooling, GELU, ``clip-bpe`` for the 49408-token vocabulary).
Without a text tower the converted checkpoint holds the image tower (``model.visual.trunk.*``, timm Eva keys)
and ``model.image_proj`` only; its config's ``model.text`` is the text tower that EVA-CLIP trained with the
named image tower (OpenCLIP's sizes, ``clip-bpe``, GELU; default sizes for other names and reduced copies),
which no weights back.

vlp's vision config: ``timm_name`` = the timm Eva name, ``timm_kwargs`` for sizes that differ from the
name's, ``pool='token'``, ``image_proj='linear_bias'`` (EVA-CLIP's head has a bias; ``'none'`` without a head).

``--arch``: ``<timm name>[:key=value,...]``, e.g. ``eva02_large_patch14_clip_224`` or, for a reduced copy,
``eva02_large_patch14_clip_224:num_heads=2`` (head counts are not visible in the weights: without
``num_heads`` a resized copy gets the name's head width, 64). ``text_heads`` (default width / 64) and
``text_act`` (default ``gelu``) set the text tower. Without ``--arch`` the name comes from the folder's
timm ``config.json`` (``architecture``/``model_args``) or OpenCLIP ``open_clip_config.json``, else from the
shapes when exactly one of timm's ``eva*clip*`` models has them.

Shape legend: W width, E shared embedding dim, T tokens (class + patches), L text positions, V vocabulary.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import re
from typing import Any

import torch
from torch import Tensor

from vlp_core.clip.config import ClipConfig
from vlp_core.config import RunConfig
from vlp_core.convert.archs import CLIP_MEAN, CLIP_STD, mlp_ratio_for
from vlp_core.convert.registry import ConversionError, Converted, Reader, Source, listing, register_reader

__all__ = ["read_timm_eva", "parse_arch", "eva_candidates"]

_PREFIXES = ("visual.trunk.", "visual.", "")
_MARKERS = ("blocks.0.attn.q_proj.weight", "blocks.0.attn.q_bias")  # separate q/k/v or EVA's q/v biases
_TEXT = "text."
_TEXT_KEYS = {"ln_1": "ln_1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "ln_2",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TEXT_BLOCK = re.compile(r"^text\.transformer\.resblocks\.(\d+)\.(.+?)(?:\.|_)(weight|bias)$")
_TEXT_OPTIONS = ("text_heads", "text_act")
# timm kwargs that vlp's tower sets itself (a timm hub config.json records them in model_args).
_VLP_SET = ("num_classes", "global_pool", "img_size", "use_fc_norm", "fc_norm", "drop_path_rate", "pretrained_cfg",
            "pretrained_cfg_overlay")
# The OpenCLIP text tower each EVA-CLIP image tower was trained with (width, layers, heads; OpenCLIP's
# EVA*-CLIP model configs): an image-only conversion's config describes that CLIP, without text weights.
_EVA_CLIP_TEXT = {"eva02_base_patch16_clip_224": (512, 12, 8), "eva02_large_patch14_clip_224": (768, 12, 12),
                  "eva02_large_patch14_clip_336": (768, 12, 12), "eva02_enormous_patch14_clip_224": (1024, 24, 16),
                  "eva_giant_patch14_clip_224": (768, 12, 12)}


def _fail(source: Source, what: str) -> ConversionError:
    return ConversionError(f"{source.path}: timm-eva: {what}")


def _prefix(sd: dict[str, Tensor]) -> str | None:
    """The prefix of the image tower's keys, or None when no EVA tower is there."""
    for p in _PREFIXES:
        if any(p + m in sd for m in _MARKERS) and p + "pos_embed" in sd:
            return p
    return None


def parse_arch(arch: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=v2"`` -> ``("name", {"k": v, "k2": v2})`` (values as Python literals when they parse)."""
    name, _, rest = arch.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConversionError(f"--arch {arch!r}: expected <timm name>[:key=value,...], got {item!r}")
        try:
            kwargs[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = raw.strip()
    return name.strip(), kwargs


# ---------------------------------------------------------------------------------------------------------
# architecture


def _mlp_rows(sd: dict[str, Tensor], p: str) -> int | None:
    """Rows of block 0's first MLP weight (SwiGLU gate ``fc1_g``/EVA-CLIP ``w1``, or ``fc1``/fused ``w12``)."""
    for n in ("fc1_g", "w1", "fc1", "w12"):
        if (w := sd.get(f"{p}blocks.0.mlp.{n}.weight")) is not None:
            return int(w.shape[0])
    return None


def _sizes(sd: dict[str, Tensor], p: str, source: Source) -> dict[str, int]:
    """Sizes visible in the weights: width, depth, patch, image size, MLP rows, head rows (0: no head)."""
    pos = sd[p + "pos_embed"]
    patch_key = p + "patch_embed.proj.weight"
    if patch_key not in sd or pos.ndim != 3:
        raise _fail(source, f"missing {patch_key} or pos_embed of shape [1, T, W] (got {list(pos.shape)})")
    prefix_tokens = 1 if p + "cls_token" in sd else 0
    grid = math.isqrt(pos.shape[1] - prefix_tokens)
    if grid * grid + prefix_tokens != pos.shape[1]:
        raise _fail(source, f"pos_embed has {pos.shape[1]} rows, not a square grid (+ class token)")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(p) + r"blocks\.(\d+)\.", k))}
    mlp = _mlp_rows(sd, p)
    if mlp is None:
        raise _fail(source, f"no MLP weight under {p}blocks.0.mlp")
    patch = int(sd[patch_key].shape[-1])
    head = sd.get(p + "head.weight")
    return {"width": int(pos.shape[-1]), "depth": max(blocks) + 1, "patch": patch, "image_size": grid * patch,
            "mlp": mlp, "head": int(head.shape[0]) if head is not None else 0}


def _built(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, int]:
    """The sizes of timm ``name`` built with ``kwargs`` (on the meta device: no memory, no init cost)."""
    return _built_cached(name, json.dumps(kwargs or {}, sort_keys=True))


@functools.cache
def _built_cached(name: str, kwargs_json: str) -> dict[str, int]:
    import timm

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, **json.loads(kwargs_json))
    return {"width": int(m.embed_dim), "depth": len(m.blocks), "patch": int(m.patch_embed.patch_size[0]),
            "image_size": int(m.patch_embed.img_size[0]), "mlp": _mlp_rows(m.state_dict(), "") or 0,
            "heads": int(m.blocks[0].attn.num_heads)}


def eva_candidates() -> list[str]:
    """timm's EVA / EVA02 CLIP image towers (the names ``--arch`` is inferred among)."""
    import timm

    return sorted(timm.list_models("eva*clip*"))


def _from_meta(source: Source) -> tuple[str, dict[str, Any]] | None:
    """A timm hub ``config.json`` (``architecture``) or OpenCLIP ``open_clip_config.json`` in the folder."""
    timm_cfg = source.meta.get("config")
    if isinstance(timm_cfg, dict) and isinstance(timm_cfg.get("architecture"), str):
        args = {k: v for k, v in (timm_cfg.get("model_args") or {}).items() if k not in _VLP_SET}
        if args.get("in_chans") == 3:
            del args["in_chans"]
        return timm_cfg["architecture"], args
    oc = source.meta.get("open_clip_config")
    if isinstance(oc, dict):
        model_cfg = oc.get("model_cfg", oc)
        name = (model_cfg.get("vision_cfg") or {}).get("timm_model_name")
        if isinstance(name, str):
            heads = (model_cfg.get("text_cfg") or {}).get("heads")
            return name, ({"text_heads": heads} if heads else {})
    return None


def _infer_name(source: Source, sizes: dict[str, int]) -> str:
    keys = ("width", "depth", "patch", "image_size", "mlp")
    fits = [n for n in eva_candidates() if all(_built(n)[k] == sizes[k] for k in keys)]
    if len(fits) != 1:
        shown = ", ".join(f"{k}={sizes[k]}" for k in keys)
        which = f"several fit: {', '.join(fits)}" if fits else f"none of {', '.join(eva_candidates())} has them"
        raise _fail(source, f"cannot tell the timm Eva model from the shapes ({shown}; {which}): "
                    "pass --arch <timm name>[:num_heads=...]")
    return fits[0]


def _resolve(source: Source, sizes: dict[str, int], arch: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """The timm name, the timm kwargs that rebuild the checkpoint's sizes, and the text options."""
    import timm

    if arch:
        name, kwargs = parse_arch(arch)
    elif (found := _from_meta(source)) is not None:
        name, kwargs = found
    else:
        name, kwargs = _infer_name(source, sizes), {}
    if not timm.is_model(name) or timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1] != "eva":
        raise _fail(source, f"{name!r} is not a timm Eva model (e.g. {', '.join(eva_candidates()[:3])})")
    text = {k: kwargs.pop(k) for k in _TEXT_OPTIONS if k in kwargs}
    d = _built(name)
    if sizes["width"] != d["width"]:
        kwargs.setdefault("embed_dim", sizes["width"])
        head_dim = d["width"] // d["heads"]
        if "num_heads" not in kwargs and sizes["width"] % head_dim:
            raise _fail(source, f"width {sizes['width']} is not a multiple of {name}'s head width {head_dim}: "
                        f"pass --arch {name}:num_heads=<heads>")
        kwargs.setdefault("num_heads", sizes["width"] // head_dim)
    for key, kwarg in (("depth", "depth"), ("patch", "patch_size")):
        if sizes[key] != d[key]:
            kwargs.setdefault(kwarg, sizes[key])
    try:
        mlp = _built(name, kwargs)["mlp"]
    except (TypeError, AssertionError, ValueError) as e:
        raise _fail(source, f"timm cannot build {name} with {kwargs}: {e}") from None
    if "mlp_ratio" not in kwargs and mlp != sizes["mlp"]:
        kwargs["mlp_ratio"] = mlp_ratio_for(sizes["mlp"], sizes["width"])
    return name, kwargs, text


# ---------------------------------------------------------------------------------------------------------
# conversion


def _image_tower(
    source: Source, prefix: str, name: str, timm_kwargs: dict[str, Any], sizes: dict[str, int]
) -> dict[str, Tensor]:
    """timm's EVA filter, checked key by key against the timm model it must load into."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    # timm's filter skips keys outside the tower's prefix: nothing may be left behind unseen.
    stray = [k for k in source.state_dict if not k.startswith((prefix, _TEXT)) and k != "logit_scale"]
    if stray:
        raise _fail(source, f"unexpected key(s) {listing(sorted(stray))} beside the image tower under {prefix!r}")
    try:
        with torch.device("meta"):
            ref = timm.create_model(name, pretrained=False, num_classes=sizes["head"], img_size=sizes["image_size"],
                                    global_pool="token", use_fc_norm=False, **timm_kwargs)
    except (TypeError, AssertionError, ValueError) as e:
        raise _fail(source, f"timm cannot build {name} with {timm_kwargs}: {e}") from None
    vision = {k: v for k, v in source.state_dict.items() if not k.startswith(_TEXT) and k != "logit_scale"}
    tower = {k: v for k, v in checkpoint_filter_fn(vision, ref).items() if "rope" not in k.split(".")[0]}
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    missing = [k for k in expected if k not in tower]
    unexpected = [k for k in tower if k not in expected]
    wrong = [f"{k} {list(tower[k].shape)} vs {list(expected[k])}" for k in expected
             if k in tower and tuple(tower[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise _fail(source, f"the weights do not fit timm {name} {timm_kwargs}: "
                    f"missing {listing(sorted(missing))}; unexpected {listing(sorted(unexpected))}; "
                    f"shapes {listing(sorted(wrong))}")
    out = {f"model.visual.trunk.{k}": v for k, v in tower.items() if not k.startswith("head.")}
    if sizes["head"]:
        out["model.image_proj.weight"], out["model.image_proj.bias"] = tower["head.weight"], tower["head.bias"]
    return out


def _text_tower(source: Source) -> dict[str, Tensor]:
    """OpenCLIP's ``text.*`` tower and ``logit_scale`` -> vlp keys (every key must be used)."""
    sd, out, left = source.state_dict, {}, []
    for k, v in sd.items():
        if not k.startswith(_TEXT):
            continue
        if m := _TEXT_BLOCK.match(k):
            part = _TEXT_KEYS.get(m.group(2))
            if part is None:
                left.append(k)
                continue
            out[f"model.text.blocks.{m.group(1)}.{part}.{m.group(3)}"] = v
        elif k in ("text.token_embedding.weight", "text.positional_embedding", "text.ln_final.weight",
                   "text.ln_final.bias"):
            out[f"model.{k}"] = v
        elif k == "text.text_projection":  # a parameter [W, E]
            out["model.text_proj.weight"] = v.t()
        elif k in ("text.text_projection.weight", "text.text_projection.bias"):  # an nn.Linear
            out[k.replace("text.text_projection", "model.text_proj")] = v
        elif k != "text.attn_mask":
            left.append(k)
    if left:
        raise _fail(source, f"unexpected text tower key(s) {listing(sorted(left))} "
                    "(OpenCLIP's TextTransformer expected)")
    needed = {"model.text.token_embedding.weight": "text.token_embedding.weight",
              "model.text.positional_embedding": "text.positional_embedding",
              "model.text.ln_final.weight": "text.ln_final.weight", "model.text_proj.weight": "text.text_projection"}
    absent = [theirs for ours, theirs in needed.items() if ours not in out]
    if absent:
        raise _fail(source, f"the text tower has no {listing(sorted(absent))}")
    if "logit_scale" not in sd:
        raise _fail(source, "a text tower without logit_scale")
    out["loss.loss.logit_scale"] = sd["logit_scale"].reshape(())
    return out


def _text_config(cfg: RunConfig, state: dict[str, Tensor], options: dict[str, Any], source: Source) -> None:
    t = cfg.model.text
    vocab, width = state["model.text.token_embedding.weight"].shape
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("model.text.blocks."))
    t.kind, t.vocab_size, t.width, t.depth = "clip", int(vocab), int(width), depth
    t.context_length = int(state["model.text.positional_embedding"].shape[0])
    t.heads = int(options.get("text_heads") or width // 64)
    if not t.heads or width % t.heads:
        raise _fail(source, f"text width {width} does not split into {t.heads} heads (default: width / 64): "
                    "pass --arch <name>:text_heads=N")
    t.mlp_ratio = mlp_ratio_for(int(state["model.text.blocks.0.mlp.fc1.weight"].shape[0]), int(width))
    t.act = options.get("text_act", "gelu")
    if t.act not in ("gelu", "quick_gelu", "gelu_tanh"):
        raise _fail(source, f"text_act {t.act!r}: expected gelu, quick_gelu or gelu_tanh")
    t.causal, t.pool, t.norm_eps = True, "eot", 1e-5
    t.tokenizer = "clip-bpe" if vocab == 49408 else ""
    cfg.model.text_proj = "linear_bias" if "model.text_proj.bias" in state else "linear"
    scale = float(state["loss.loss.logit_scale"])
    cfg.loss.max_logit_scale = float(max(100.0, math.ceil(math.exp(scale))))


def read_timm_eva(source: Source, arch: str | None = None) -> Converted:
    """An EVA02 / EVA-CLIP image tower (optionally with its OpenCLIP text tower) -> vlp (see the module doc)."""
    import timm

    sd = source.state_dict
    p = _prefix(sd)
    if p is None:
        raise _fail(source, "no EVA image tower found (expected [visual.[trunk.]]blocks.0.attn.q_proj.weight or "
                    "q_bias, and pos_embed)")
    sizes = _sizes(sd, p, source)
    name, timm_kwargs, text_options = _resolve(source, sizes, arch)
    state = _image_tower(source, p, name, timm_kwargs, sizes)
    has_text = any(k.startswith(_TEXT) for k in sd)
    if has_text:
        state.update(_text_tower(source))
    elif "logit_scale" in sd:
        raise _fail(source, "logit_scale without a text tower (text.*)")

    cfg = RunConfig(method="clip", preset="timm-eva", loss=ClipConfig(kind="infonce"))
    v = cfg.model.vision
    v.timm_name, v.timm_kwargs, v.image_size, v.pool = name, timm_kwargs, sizes["image_size"], "token"
    v.width, v.depth, v.patch_size = sizes["width"], sizes["depth"], sizes["patch"]
    v.heads = int(timm_kwargs.get("num_heads", _built(name)["heads"]))
    pretrained = timm.models.get_pretrained_cfg(name)
    mean, std = (getattr(pretrained, "mean", None), getattr(pretrained, "std", None)) if pretrained else (None, None)
    v.image_mean, v.image_std = list(mean or CLIP_MEAN), list(std or CLIP_STD)
    v.interpolation = "bicubic"
    cfg.model.embed_dim = sizes["head"] or sizes["width"]
    cfg.model.image_proj = "linear_bias" if sizes["head"] else "none"
    t = cfg.model.text
    t.tokenizer, t.vocab_size, t.context_length, t.act = "clip-bpe", 49408, 77, "gelu"
    if not timm_kwargs:  # a reduced copy belongs to no EVA-CLIP model: the text defaults stay
        t.width, t.depth, t.heads = _EVA_CLIP_TEXT.get(name, (t.width, t.depth, t.heads))
    if has_text:
        _text_config(cfg, state, text_options, source)
        if state["model.text_proj.weight"].shape[0] != cfg.model.embed_dim:
            raise _fail(source, f"text projection gives {state['model.text_proj.weight'].shape[0]} dims, the image "
                        f"head {cfg.model.embed_dim}")
    return Converted(state_dict=state, config=cfg, layout="timm-eva")


register_reader(Reader(
    name="timm-eva",
    description="EVA02 / EVA-CLIP image tower (timm Eva, EVA-CLIP visual.*, OpenCLIP visual.trunk.*), with its "
                "OpenCLIP text tower when present",
    detect=lambda source: _prefix(source.state_dict) is not None,
    read=read_timm_eva,
    priority=15,
))
