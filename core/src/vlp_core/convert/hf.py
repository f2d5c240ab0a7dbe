"""Hugging Face ``CLIPModel`` / ``SiglipModel`` folders: readers ``hf-clip``, ``hf-siglip`` and the writer ``hf``.

Both directions go through one table of :class:`Rule` s per model kind (HF keys <-> vlp ``TrainStep`` keys,
with the reshapes between them), so reading and writing cannot drift apart.

- ``hf-clip``: vision (class token, bias-free patch embedding, ``pre_layrnorm`` = timm ``norm_pre``,
  ``post_layernorm`` = timm ``norm``), ``visual_projection``, the causal text tower (pooled at the first
  end-of-text token: vlp's ``eot`` pool), ``text_projection`` and ``logit_scale`` (InfoNCE).
- ``hf-siglip``: vision without class token, with a patch-embedding bias and the attention-pool head
  (``SiglipMultiheadAttentionPoolingHead`` = timm ``AttentionPoolLatent``: ``in_proj`` split into ``q`` and
  ``kv``), a non-causal text tower that attends to pads and pools the last position, its ``head`` (a linear
  layer with bias) as ``text_proj``, ``logit_scale``/``logit_bias`` (sigmoid loss).
- ``hf`` writer: the inverse, plus ``preprocessor_config.json`` and the tokenizer files (``clip-bpe`` becomes
  HF ``CLIPTokenizer`` files, same ids as vlp/OpenCLIP up to the end-of-text token; an HF tokenizer folder
  is re-saved).

Shape legend: W tower width, E shared embedding dim, T vision tokens (class + patches), L text positions,
V vocabulary size.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp_core.clip.config import ClipConfig
from vlp_core.config import RunConfig
from vlp_core.convert.archs import mlp_ratio_for
from vlp_core.convert.registry import (
    ConversionError,
    Converted,
    Reader,
    Source,
    Writer,
    listing,
    register_reader,
    register_writer,
)

__all__ = ["Rule", "clip_rules", "siglip_rules", "read_hf_clip", "read_hf_siglip", "write_hf", "hf_kind"]

_log = logging.getLogger("vlp")

CLIP_BPE_VOCAB = 49408
_BPE_MERGES = 49152 - 256 - 2  # OpenAI CLIP uses lines 1..48894 of the vocabulary file
# HF activation names <-> vlp's. gelu_new is the tanh approximation too (same formula as gelu_pytorch_tanh).
_ACT_TO_VLP = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes used by HF image processors
_IGNORED_SUFFIXES = ("position_ids",)  # non-persistent buffers that old transformers versions saved
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


# ---------------------------------------------------------------------------------------------------------
# the key tables


@dataclass(frozen=True)
class Rule:
    """HF keys <-> vlp keys, with the tensor transforms both ways (lists, so that q,k,v can fuse)."""

    hf: tuple[str, ...]
    vlp: tuple[str, ...]
    to_vlp: Callable[[list[Tensor]], list[Tensor]] = lambda ts: ts
    to_hf: Callable[[list[Tensor]], list[Tensor]] = lambda ts: ts


def _copy(hf: str, vlp: str) -> Rule:
    return Rule((hf,), (vlp,))


def _cls_token(hf: str, vlp: str) -> Rule:
    """HF ``[W]`` <-> timm ``[1, 1, W]``."""
    return Rule((hf,), (vlp,), to_vlp=lambda ts: [ts[0].reshape(1, 1, -1)], to_hf=lambda ts: [ts[0].reshape(-1)])


def _pos_embed(hf: str, vlp: str) -> Rule:
    """HF embedding table ``[T, W]`` <-> timm ``pos_embed`` ``[1, T, W]``."""
    return Rule((hf,), (vlp,), to_vlp=lambda ts: [ts[0][None]], to_hf=lambda ts: [ts[0][0]])


def _scalar(hf: str, vlp: str, hf_shape: tuple[int, ...]) -> Rule:
    return Rule((hf,), (vlp,), to_vlp=lambda ts: [ts[0].reshape(())], to_hf=lambda ts: [ts[0].reshape(hf_shape)])


def _fused_qkv(hf_prefix: str, vlp_key: str, suffix: str) -> Rule:
    """HF ``{q,k,v}_proj.{suffix}`` <-> vlp ``attn.qkv.{suffix}`` ([3W, W] / [3W], order q, k, v)."""
    return Rule(
        tuple(f"{hf_prefix}{n}_proj.{suffix}" for n in "qkv"), (f"{vlp_key}.{suffix}",),
        to_vlp=lambda ts: [torch.cat(ts, dim=0)], to_hf=lambda ts: list(ts[0].chunk(3, dim=0)),
    )


def _layers(hf_prefix: str, vlp_prefix: str, depth: int, norms: tuple[str, str]) -> list[Rule]:
    """One HF encoder (``layers.{i}``) <-> vlp blocks (``blocks.{i}``; norms ``norm1/2`` or ``ln_1/2``)."""
    rules: list[Rule] = []
    for i in range(depth):
        h, v = f"{hf_prefix}encoder.layers.{i}.", f"{vlp_prefix}blocks.{i}."
        for p in ("weight", "bias"):
            rules += [
                _copy(f"{h}layer_norm1.{p}", f"{v}{norms[0]}.{p}"),
                _fused_qkv(f"{h}self_attn.", f"{v}attn.qkv", p),
                _copy(f"{h}self_attn.out_proj.{p}", f"{v}attn.proj.{p}"),
                _copy(f"{h}layer_norm2.{p}", f"{v}{norms[1]}.{p}"),
                _copy(f"{h}mlp.fc1.{p}", f"{v}mlp.fc1.{p}"),
                _copy(f"{h}mlp.fc2.{p}", f"{v}mlp.fc2.{p}"),
            ]
    return rules


def _norm(hf: str, vlp: str) -> list[Rule]:
    return [_copy(f"{hf}.{p}", f"{vlp}.{p}") for p in ("weight", "bias")]


def _text_rules(depth: int) -> list[Rule]:
    t, v = "text_model.", "model.text."
    return [
        _copy(f"{t}embeddings.token_embedding.weight", f"{v}token_embedding.weight"),
        _copy(f"{t}embeddings.position_embedding.weight", f"{v}positional_embedding"),
        *_layers(t, v, depth, ("ln_1", "ln_2")),
        *_norm(f"{t}final_layer_norm", f"{v}ln_final"),
    ]


def clip_rules(vision_depth: int, text_depth: int) -> list[Rule]:
    """The table of an HF ``CLIPModel``."""
    h, v = "vision_model.", "model.visual.trunk."
    return [
        _cls_token(f"{h}embeddings.class_embedding", f"{v}cls_token"),
        _copy(f"{h}embeddings.patch_embedding.weight", f"{v}patch_embed.proj.weight"),
        _pos_embed(f"{h}embeddings.position_embedding.weight", f"{v}pos_embed"),
        *_norm(f"{h}pre_layrnorm", f"{v}norm_pre"),
        *_layers(h, v, vision_depth, ("norm1", "norm2")),
        *_norm(f"{h}post_layernorm", f"{v}norm"),
        _copy("visual_projection.weight", "model.image_proj.weight"),
        *_text_rules(text_depth),
        _copy("text_projection.weight", "model.text_proj.weight"),
        _scalar("logit_scale", "loss.loss.logit_scale", ()),
    ]


def _split_in_proj(ts: list[Tensor]) -> list[Tensor]:
    w = ts[0].shape[0] // 3
    return [ts[0][:w], ts[0][w:]]


def siglip_rules(vision_depth: int, text_depth: int) -> list[Rule]:
    """The table of an HF ``SiglipModel`` (vision head = timm ``AttentionPoolLatent``)."""
    h, v = "vision_model.", "model.visual.trunk."
    head, pool = f"{h}head.", f"{v}attn_pool."
    rules = [
        _copy(f"{h}embeddings.patch_embedding.weight", f"{v}patch_embed.proj.weight"),
        _copy(f"{h}embeddings.patch_embedding.bias", f"{v}patch_embed.proj.bias"),
        _pos_embed(f"{h}embeddings.position_embedding.weight", f"{v}pos_embed"),
        *_layers(h, v, vision_depth, ("norm1", "norm2")),
        *_norm(f"{h}post_layernorm", f"{v}norm"),
        _copy(f"{head}probe", f"{pool}latent"),
        *_norm(f"{head}layernorm", f"{pool}norm"),
        *_text_rules(text_depth),
        _copy("text_model.head.weight", "model.text_proj.weight"),
        _copy("text_model.head.bias", "model.text_proj.bias"),
        _scalar("logit_scale", "loss.loss.logit_scale", (1,)),
        _scalar("logit_bias", "loss.loss.logit_bias", (1,)),
    ]
    for p in ("weight", "bias"):
        rules += [
            Rule((f"{head}attention.in_proj_{p}",), (f"{pool}q.{p}", f"{pool}kv.{p}"),
                 to_vlp=_split_in_proj, to_hf=lambda ts: [torch.cat(ts, dim=0)]),
            _copy(f"{head}attention.out_proj.{p}", f"{pool}proj.{p}"),
            _copy(f"{head}mlp.fc1.{p}", f"{pool}mlp.fc1.{p}"),
            _copy(f"{head}mlp.fc2.{p}", f"{pool}mlp.fc2.{p}"),
        ]
    return rules


def _apply(rules: Sequence[Rule], tensors: dict[str, Tensor], *, forward: bool, where: str) -> dict[str, Tensor]:
    """Map ``tensors`` through ``rules`` (HF -> vlp if ``forward``); every source key must be used."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for rule in rules:
        src, dst = (rule.hf, rule.vlp) if forward else (rule.vlp, rule.hf)
        absent = [k for k in src if k not in tensors]
        if absent:
            missing += absent
            continue
        used.update(src)
        results = (rule.to_vlp if forward else rule.to_hf)([tensors[k] for k in src])
        out.update(zip(dst, results, strict=True))
    if missing:
        raise ConversionError(f"{where}: missing tensor(s) {listing(sorted(missing))}")
    extra = [k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if forward and extra:
        raise ConversionError(f"{where}: unexpected tensor(s) {listing(sorted(extra))} (not part of the layout)")
    return out


# ---------------------------------------------------------------------------------------------------------
# readers


def _folder_config(source: Source, name: str = "config.json") -> dict[str, Any] | None:
    """A JSON file of the source folder (``config.json`` may already sit in ``source.meta['config']``)."""
    if name == "config.json" and isinstance(source.meta.get("config"), dict):
        return source.meta["config"]
    path = source.path / name
    if not source.path.is_dir() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not readable JSON ({e})") from None


def _model_type(source: Source) -> str | None:
    cfg = _folder_config(source)
    return cfg.get("model_type") if cfg else None


def _hf_config(source: Source, expected: str) -> Any:
    """The folder's config.json as a transformers config of ``model_type`` ``expected``."""
    raw = _folder_config(source)
    if raw is None:
        raise ConversionError(f"{source.path}: an HF {expected} checkpoint needs the folder with its config.json")
    if raw.get("model_type") != expected:
        raise ConversionError(
            f"{source.path}/config.json: model_type is {raw.get('model_type')!r}, reader hf-{expected} expects "
            f"{expected!r}"
        )
    from transformers import CLIPConfig, SiglipConfig

    cls = CLIPConfig if expected == "clip" else SiglipConfig
    return cls.from_dict(raw)


def _act(name: str, where: str) -> str:
    if name not in _ACT_TO_VLP:
        raise ConversionError(f"{where}: hidden_act {name!r} has no vlp equivalent (known: {sorted(_ACT_TO_VLP)})")
    return _ACT_TO_VLP[name]


def _ratio(tower: Any) -> float:
    return mlp_ratio_for(tower.intermediate_size, tower.hidden_size)


def _tokenizer_of(source: Source) -> str:
    """The source folder when it holds tokenizer files, else empty (the model still builds: vocab_size is set)."""
    if source.path.is_dir() and any((source.path / n).is_file() for n in _TOKENIZER_FILES):
        return str(source.path.resolve())
    return ""


def _preprocessing(source: Source, cfg: RunConfig) -> None:
    """Mean/std/interpolation from ``preprocessor_config.json`` when the folder has one."""
    pre = _folder_config(source, "preprocessor_config.json")
    v = cfg.model.vision
    if pre:
        v.image_mean = [float(x) for x in pre.get("image_mean", v.image_mean)]
        v.image_std = [float(x) for x in pre.get("image_std", v.image_std)]
        v.interpolation = _RESAMPLE.get(pre.get("resample"), v.interpolation)  # type: ignore[assignment]


def _tower_sizes(cfg: RunConfig, hf: Any, where: str) -> None:
    v, t = cfg.model.vision, cfg.model.text
    vc, tc = hf.vision_config, hf.text_config
    v.timm_name, v.image_size, v.patch_size = "", vc.image_size, vc.patch_size
    v.width, v.depth, v.heads = vc.hidden_size, vc.num_hidden_layers, vc.num_attention_heads
    v.mlp_ratio, v.act, v.norm_eps = _ratio(vc), _act(vc.hidden_act, where), vc.layer_norm_eps  # type: ignore[assignment]
    t.kind, t.context_length = "clip", tc.max_position_embeddings
    t.width, t.depth, t.heads = tc.hidden_size, tc.num_hidden_layers, tc.num_attention_heads
    t.mlp_ratio, t.act, t.norm_eps = _ratio(tc), _act(tc.hidden_act, where), tc.layer_norm_eps  # type: ignore[assignment]


def _max_scale(logit_scale: Tensor) -> float:
    """A cap that leaves the checkpoint's temperature unclamped (vlp clamps to ``max_logit_scale``)."""
    return float(max(100.0, math.ceil(math.exp(float(logit_scale)))))


def _check_width(state: dict[str, Tensor], key: str, dim: int, size: int, where: str) -> None:
    if state[key].shape[dim] != size:
        raise ConversionError(
            f"{where}: {key} has shape {list(state[key].shape)}, config.json says size {size} along dim {dim}"
        )


def read_hf_clip(source: Source, arch: str | None = None) -> Converted:
    """An HF ``CLIPModel`` folder -> vlp's CLIP (``arch`` is unused: config.json says everything)."""
    where = str(source.path)
    hf = _hf_config(source, "clip")
    cfg = RunConfig(method="clip", preset="hf-clip", loss=ClipConfig(kind="infonce"))
    _tower_sizes(cfg, hf, where)
    v, t = cfg.model.vision, cfg.model.text
    v.class_token, v.pool, v.pre_norm, v.interpolation = True, "token", True, "bicubic"
    t.causal, t.pool = True, "eot"
    cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj = hf.projection_dim, "linear", "linear"
    state = _apply(clip_rules(v.depth, t.depth), source.state_dict, forward=True, where=where)
    _check_width(state, "model.visual.trunk.cls_token", 2, v.width, where)
    _check_width(state, "model.text.token_embedding.weight", 1, t.width, where)
    _check_width(state, "model.image_proj.weight", 0, cfg.model.embed_dim, where)
    t.vocab_size = int(state["model.text.token_embedding.weight"].shape[0])
    eos = hf.text_config.eos_token_id
    if t.vocab_size == CLIP_BPE_VOCAB and eos in (2, CLIP_BPE_VOCAB - 1):
        t.tokenizer = "clip-bpe"
    else:
        t.tokenizer = _tokenizer_of(source)
    cfg.loss.max_logit_scale = _max_scale(state["loss.loss.logit_scale"])
    _preprocessing(source, cfg)
    return Converted(state_dict=state, config=cfg, layout="hf-clip")


def read_hf_siglip(source: Source, arch: str | None = None) -> Converted:
    """An HF ``SiglipModel`` folder -> vlp's SigLIP (MAP-pooled vision, last-token text, sigmoid loss)."""
    where = str(source.path)
    hf = _hf_config(source, "siglip")
    if not getattr(hf.vision_config, "vision_use_head", True):
        raise ConversionError(f"{where}/config.json: vision_use_head is false (no pooling head); not supported")
    cfg = RunConfig(method="clip", preset="hf-siglip", loss=ClipConfig(kind="siglip"))
    _tower_sizes(cfg, hf, where)
    v, t = cfg.model.vision, cfg.model.text
    v.class_token, v.pool, v.pre_norm = False, "map", False
    v.image_mean, v.image_std, v.interpolation = [0.5] * 3, [0.5] * 3, "bilinear"
    t.causal, t.mask_pads, t.pool = False, False, "last"
    proj = getattr(hf.text_config, "projection_size", None) or t.width
    if proj != v.width:
        raise ConversionError(
            f"{where}/config.json: text projection_size {proj} differs from the vision width {v.width}; vlp's "
            "image_proj 'none' needs them equal"
        )
    cfg.model.embed_dim, cfg.model.image_proj, cfg.model.text_proj = v.width, "none", "linear_bias"
    state = _apply(siglip_rules(v.depth, t.depth), source.state_dict, forward=True, where=where)
    _check_width(state, "model.visual.trunk.pos_embed", 2, v.width, where)
    _check_width(state, "model.text.token_embedding.weight", 1, t.width, where)
    t.vocab_size = int(state["model.text.token_embedding.weight"].shape[0])
    t.tokenizer = _tokenizer_of(source)
    cfg.loss.max_logit_scale = _max_scale(state["loss.loss.logit_scale"])
    _preprocessing(source, cfg)
    return Converted(state_dict=state, config=cfg, layout="hf-siglip")


def _detect(model_type: str, marker: str) -> Callable[[Source], bool]:
    """This model_type in config.json, or the layout's keys (the reader then names what does not fit)."""

    def detect(source: Source) -> bool:
        return _model_type(source) == model_type or marker in source.state_dict

    return detect


# ---------------------------------------------------------------------------------------------------------
# writer


def hf_kind(cfg: RunConfig) -> str:
    """``"clip"`` or ``"siglip"``: the HF model that expresses ``cfg``'s towers exactly.

    Raises:
        ConversionError: Listing every setting that neither HF CLIP nor HF SigLIP can express.
    """
    m, v, t = cfg.model, cfg.model.vision, cfg.model.text
    common = {
        "vision.timm_name is set (only the explicit ViT build maps to HF)": bool(v.timm_name),
        f"vision.stem {v.stem!r}": v.stem != "patch",
        f"vision.extra_tokens {v.extra_tokens}": v.extra_tokens != 0,
        f"text.kind {t.kind!r}": t.kind != "clip",
    }
    clip = {
        **common,
        "vision.class_token false": not v.class_token,
        f"vision.pool {v.pool!r} (HF CLIP pools the class token)": v.pool != "token",
        "vision.pre_norm false (HF CLIP has pre_layrnorm)": not v.pre_norm,
        "text.causal false": not t.causal,
        f"text.pool {t.pool!r} (HF CLIP pools the first end-of-text)": t.pool != "eot",
        f"image_proj {m.image_proj!r}": m.image_proj != "linear",
        f"text_proj {m.text_proj!r}": m.text_proj != "linear",
    }
    siglip = {
        **common,
        "vision.class_token true": v.class_token,
        f"vision.pool {v.pool!r} (HF SigLIP uses the attention-pool head, 'map')": v.pool != "map",
        "vision.pre_norm true": v.pre_norm,
        "text.causal true": t.causal,
        "text.mask_pads true (HF SigLIP attends to pads)": t.mask_pads,
        f"text.pool {t.pool!r} (HF SigLIP pools the last position)": t.pool != "last",
        f"image_proj {m.image_proj!r} (HF SigLIP has no image projection)": m.image_proj != "none",
        f"embed_dim {m.embed_dim} != vision.width {v.width}": m.embed_dim != v.width,
    }
    for name, problems in (("clip", clip), ("siglip", siglip)):
        if not any(problems.values()):
            return name
    looks_siglip = not v.class_token or v.pool == "map"
    problems = siglip if looks_siglip else clip
    raise ConversionError(
        f"this model cannot be written as an HF {'SiglipModel' if looks_siglip else 'CLIPModel'}: "
        + "; ".join(k for k, bad in problems.items() if bad)
    )


def _hf_tower(tower: Any, fc1: Tensor, *, image: bool) -> dict[str, Any]:
    """An HF tower config; the MLP width is read from the weights (``fc1`` of block 0)."""
    d = {
        "hidden_size": tower.width, "num_hidden_layers": tower.depth, "num_attention_heads": tower.heads,
        "intermediate_size": int(fc1.shape[0]), "hidden_act": _ACT_TO_HF[tower.act], "layer_norm_eps": tower.norm_eps,
    }
    if image:
        d.update(image_size=tower.image_size, patch_size=tower.patch_size, num_channels=3)
    return d


def _text_ids(cfg: RunConfig, kind: str) -> tuple[int | None, int | None, int | None, Any]:
    """(bos, eos, pad, HF tokenizer) of the model's tokenizer; ``clip-bpe`` has no HF object (files are made)."""
    name = cfg.model.text.tokenizer
    if name == "clip-bpe":
        return CLIP_BPE_VOCAB - 2, CLIP_BPE_VOCAB - 1, 0, None
    if not name:
        if kind == "clip":  # HF CLIP pools at the end-of-text id: it must be known
            raise ConversionError("model.text.tokenizer is empty: HF CLIP needs the tokenizer's end-of-text id")
        _log.warning("model.text.tokenizer is empty: the HF folder is written without a tokenizer")
        return None, None, None, None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ConversionError(f"tokenizer {name!r} could not be loaded: {e}") from None
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    if eos is None:
        raise ConversionError(f"tokenizer {name!r} has no end-of-text (eos/sep) token")
    return bos, eos, pad, tok


def _hf_config_for(kind: str, cfg: RunConfig, state: dict[str, Tensor], ids: tuple[int | None, ...]) -> Any:
    from transformers import CLIPConfig, SiglipConfig

    v, t = cfg.model.vision, cfg.model.text
    bos, eos, pad = ids
    vocab = int(state["model.text.token_embedding.weight"].shape[0])
    text = {**_hf_tower(t, state["model.text.blocks.0.mlp.fc1.weight"], image=False), "vocab_size": vocab,
            "max_position_embeddings": t.context_length, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    vision = _hf_tower(v, state["model.visual.trunk.blocks.0.mlp.fc1.weight"], image=True)
    if kind == "clip":
        if eos == 2:
            raise ConversionError(
                f"tokenizer {t.tokenizer!r}: end-of-text id 2 would trigger HF CLIP's legacy argmax pooling"
            )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.model.embed_dim)
    text["projection_size"] = cfg.model.embed_dim
    return SiglipConfig(text_config=text, vision_config={**vision, "vision_use_head": True})


def _complete_projections(kind: str, cfg: RunConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fill what the HF layout has and vlp's config leaves implicit (zero head bias, identity head, bias 0)."""
    state = dict(state)
    if kind != "siglip":
        return state
    width, embed = cfg.model.text.width, cfg.model.embed_dim
    dtype = state["model.text.token_embedding.weight"].dtype
    if cfg.model.text_proj == "none":
        if width != embed:
            raise ConversionError(f"text_proj 'none' needs text.width {width} == embed_dim {embed}")
        state["model.text_proj.weight"] = torch.eye(embed, dtype=dtype)
    state.setdefault("model.text_proj.bias", torch.zeros(embed, dtype=dtype))
    state.setdefault("loss.loss.logit_bias", torch.zeros((), dtype=dtype))  # InfoNCE-trained: plain scaled cosine
    return state


def _check_against_hf(model_cls: Any, hf_cfg: Any, sd: dict[str, Tensor]) -> None:
    """Keys and shapes against the HF class itself (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        ref = model_cls(hf_cfg).state_dict()
    missing = [k for k in ref if k not in sd and not k.endswith(_IGNORED_SUFFIXES)]
    bad = [f"{k} {list(sd[k].shape)} vs {list(ref[k].shape)}" for k in ref if k in sd and sd[k].shape != ref[k].shape]
    if missing or bad:
        raise ConversionError(f"HF {model_cls.__name__} layout mismatch: missing {missing[:5]}, shapes {bad[:5]}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _clip_bpe_files(out: Path, context_length: int) -> None:
    """HF ``CLIPTokenizer`` files (vocab.json, merges.txt, tokenizer.json/config) from vlp-core's BPE file.

    Ids equal vlp's/OpenCLIP's up to the end-of-text token; HF pads with ``<|endoftext|>`` (as OpenAI's HF
    releases do) where they pad with ``!`` (id 0): making ``!`` the pad token would make it an added token
    and change how a trailing ``!`` is encoded. Causal CLIP towers never see what follows the first EOT.
    """
    asset = resources.files("vlp_core") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    if not asset.is_file():
        raise ConversionError(f"vlp-core's CLIP BPE vocabulary is missing: {asset}")
    lines = gzip.decompress(asset.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _BPE_MERGES + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_BPE_VOCAB:
        raise ConversionError(f"{asset}: gives {len(tokens)} tokens, expected {CLIP_BPE_VOCAB}")
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=context_length)
    tok.save_pretrained(str(out))


def _image_processor(kind: str, cfg: RunConfig) -> Any:
    v = cfg.model.vision
    resample = {name: code for code, name in _RESAMPLE.items()}[v.interpolation]
    common = dict(image_mean=list(v.image_mean), image_std=list(v.image_std), resample=resample)
    if kind == "clip":
        from transformers import CLIPImageProcessor

        size = v.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **common)
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(size={"height": v.image_size, "width": v.image_size}, **common)


def write_hf(converted: Converted, out: Path) -> None:
    """Write ``converted`` as a folder that ``transformers.CLIPModel``/``SiglipModel.from_pretrained`` loads.

    Everything is checked first, then written into a temporary sibling folder renamed to ``out`` at the end.

    Raises:
        ConversionError: The towers have no HF CLIP/SigLIP equivalent, a weight is missing or left over, the
            tokenizer cannot be loaded, or ``out`` is a non-empty folder.
    """
    from transformers import CLIPModel, SiglipModel

    cfg = converted.config
    kind = hf_kind(cfg)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: the HF output folder exists and is not empty")
    state = _complete_projections(kind, cfg, converted.state_dict)
    v, t = cfg.model.vision, cfg.model.text
    rules = (clip_rules if kind == "clip" else siglip_rules)(v.depth, t.depth)
    used = {k for r in rules for k in r.vlp}
    src = {k: x for k, x in state.items() if k.startswith("model.") or k in used}
    sd = _apply(rules, src, forward=False, where=f"vlp checkpoint ({converted.layout})")
    extra = [k for k in src if k not in used]
    if extra:
        raise ConversionError(f"model tensor(s) with no place in an HF {kind} model: {listing(sorted(extra))}")
    *ids, tokenizer = _text_ids(cfg, kind)
    hf_cfg = _hf_config_for(kind, cfg, state, tuple(ids))
    if kind == "clip" and "loss.loss.logit_bias" in state:
        # Sigmoid-trained CLIP towers: HF CLIP has no logit bias; keep it in config.json for the record.
        hf_cfg.vlp_logit_bias = float(state["loss.loss.logit_bias"])
        _log.warning("HF CLIPModel has no logit bias: the sigmoid loss's bias %.4g is kept only as "
                     "config.json 'vlp_logit_bias'", hf_cfg.vlp_logit_bias)
    if kind == "siglip" and t.tokenizer == "clip-bpe":
        _log.warning("this SigLIP text tower attends to pads: pad with id 0 ('!'), as vlp does, to reproduce its "
                     "text embeddings (the written CLIPTokenizer pads with <|endoftext|>)")
    model_cls = CLIPModel if kind == "clip" else SiglipModel
    _check_against_hf(model_cls, hf_cfg, sd)
    hf_cfg.architectures = [model_cls.__name__]
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write_folder(tmp, kind, cfg, hf_cfg, sd, tokenizer)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        _log.info("wrote %s (Hugging Face %s folder, from %s)", out, model_cls.__name__, converted.layout)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_folder(out: Path, kind: str, cfg: RunConfig, hf_cfg: Any, sd: dict[str, Tensor], tokenizer: Any) -> None:
    from safetensors.torch import save_file

    hf_cfg.save_pretrained(str(out))
    save_file({k: x.detach().contiguous().cpu() for k, x in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _image_processor(kind, cfg).save_pretrained(str(out))
    if cfg.model.text.tokenizer == "clip-bpe":
        _clip_bpe_files(out, cfg.model.text.context_length)
    elif tokenizer is not None:
        tokenizer.model_max_length = cfg.model.text.context_length
        tokenizer.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------------------
# registration

register_reader(Reader(
    name="hf-clip",
    description="Hugging Face CLIPModel folder (config.json model_type 'clip' + model.safetensors/pytorch_model.bin)",
    detect=_detect("clip", "vision_model.embeddings.class_embedding"),
    read=read_hf_clip,
    priority=20,
))
register_reader(Reader(
    name="hf-siglip",
    description="Hugging Face SiglipModel folder (config.json model_type 'siglip')",
    detect=_detect("siglip", "vision_model.head.probe"),
    read=read_hf_siglip,
    priority=21,
))
register_writer(Writer(
    name="hf",
    description="Hugging Face folder loadable by transformers CLIPModel/SiglipModel (+ processor and tokenizer)",
    write=write_hf,
))
