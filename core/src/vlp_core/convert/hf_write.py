"""The ``hf`` writer: a vlp CLIP- or SigLIP-shaped model as a Hugging Face ``CLIPModel`` / ``SiglipModel`` folder.

The inverse of the readers in :mod:`vlp_core.convert.hf` (the same :class:`~vlp_core.convert.hf.Rule`
tables, run backwards), plus ``preprocessor_config.json`` and the tokenizer files (``clip-bpe`` becomes HF
``CLIPTokenizer`` files, same ids as vlp/OpenCLIP up to the end-of-text token; an HF tokenizer folder is
re-saved). The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp_core.config import RunConfig
from vlp_core.convert.hf import (
    _ACT_TO_HF,
    _IGNORED_SUFFIXES,
    _RESAMPLE,
    CLIP_BPE_VOCAB,
    _apply,
    _log,
    clip_rules,
    siglip_rules,
)
from vlp_core.convert.registry import (
    ConversionError,
    Converted,
    Writer,
    listing,
    register_writer,
)

__all__ = ["write_hf", "hf_kind"]


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


def _clip_bpe_files(out: Path, context_length: int) -> None:
    """HF ``CLIPTokenizer`` files (vocab.json, merges.txt, tokenizer.json/config) from vlp-core's CLIP BPE.

    Ids equal vlp's/OpenCLIP's up to the end-of-text token; HF pads with ``<|endoftext|>`` (as OpenAI's HF
    releases do) where they pad with ``!`` (id 0): making ``!`` the pad token would make it an added token
    and change how a trailing ``!`` is encoded. Causal CLIP towers never see what follows the first EOT.
    """
    from transformers import CLIPTokenizer

    from vlp_core.data.tokenizer import clip_bpe

    bpe = clip_bpe()
    # vlp names the specials <start_of_text>/<end_of_text> as OpenCLIP does; HF's CLIPTokenizer spells them
    # <|startoftext|>/<|endoftext|> (same ids).
    tokens = [*bpe.tokens[:-2], "<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in bpe.merges) + "\n")
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


register_writer(Writer(
    name="hf",
    description="Hugging Face folder loadable by transformers CLIPModel/SiglipModel (+ processor and tokenizer)",
    write=write_hf,
))
