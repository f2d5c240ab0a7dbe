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
- the ``hf`` writer (:mod:`vlp_core.convert.hf_write`) uses the same tables backwards.

Shape legend: W tower width, E shared embedding dim, T vision tokens (class + patches), L text positions,
V vocabulary size.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    listing,
    register_reader,
)

__all__ = ["Rule", "clip_rules", "siglip_rules", "read_hf_clip", "read_hf_siglip"]

_log = logging.getLogger("vlp")

CLIP_BPE_VOCAB = 49408
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
