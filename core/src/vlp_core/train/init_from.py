"""``--init-from PATH``: start a run's towers from released or converted weights (fresh optimizer, step 0).

The source is any checkpoint ``vlp-convert`` reads (a vlp checkpoint, a trainer checkpoint, or a raw
OpenAI / OpenCLIP / Hugging Face / EVA / method-released file, converted on the fly; a layout whose
architecture the keys cannot tell needs converting first with ``vlp-convert --arch``). What is loaded:

- every **tower** of the run's model (``model.visual``, ``model.text``; ``train.init_towers`` picks which)
  that the source holds. A tower is loaded whole or not at all: a key missing from the source, or a shape
  that differs, stops the run with an error naming the keys (e.g. a Llip model with K mixture tokens cannot
  take a CLIP class-token ViT: start only its text tower with ``--set train.init_towers=text``);
- the **projections** (``model.image_proj``, ``model.text_proj``) and the loss module's learnable values
  (``loss.*``: temperature, bias) where the source has the same key with the same shape;
- nothing else: a method's own heads keep their initialisation. Towers the source lacks (e.g. the text
  tower when starting from an image-only EVA checkpoint) stay as initialised. One log line lists both.

Tower settings the weights were trained with (activation, LayerNorm epsilon, ln_pre, pooling) must match
the run's config: a mismatch is an error that names the key to set, never a silent change of function.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vlp_core.config import RunConfig, to_dict
from vlp_core.convert.registry import key_problems, listing, shape_mismatches

__all__ = ["init_from", "load_towers"]

log = logging.getLogger("vlp")

_TOWERS = ("model.visual.", "model.text.")
_OPTIONAL = ("model.image_proj.", "model.text_proj.", "loss.")
# Tower settings that change the function computed by the same weights.
_MUST_MATCH = {
    "model.visual.": ("vision", ("act", "pre_norm", "norm_eps", "timm_name", "image_size")),
    "model.text.": ("text", ("kind", "act", "norm_eps", "causal", "mask_pads", "pool")),
}


def _check_settings(prefix: str, run_cfg: RunConfig, saved_cfg: Mapping[str, Any] | None, where: str) -> None:
    if not saved_cfg:
        return
    section, fields = _MUST_MATCH[prefix]
    mine = to_dict(getattr(run_cfg.model, section))
    theirs = saved_cfg.get("model", {}).get(section, {})
    for name in fields:
        if name in theirs and theirs[name] != mine.get(name):
            raise ValueError(
                f"{where}: its {section} tower was trained with model.{section}.{name}={theirs[name]!r} but this "
                f"run has {mine.get(name)!r}: set --set model.{section}.{name}={theirs[name]} (or use a preset "
                "with the same tower)"
            )


def load_towers(
    target: nn.Module, state_dict: Mapping[str, Tensor], *, where: str, run_cfg: RunConfig | None = None,
    saved_cfg: Mapping[str, Any] | None = None, towers: tuple[str, ...] = ("visual", "text"),
) -> dict[str, list[str]]:
    """Copy the towers (whole), projections and loss values of ``state_dict`` into ``target`` (a TrainStep).

    ``towers`` limits which towers are considered (``train.init_towers``): e.g. only ``("text",)`` for a
    model whose image tower has no counterpart in the source (Llip's K mixture tokens). The projection of a
    tower that is not loaded is not loaded either.

    Returns:
        ``{"loaded": [...], "kept": [...]}``: the parts loaded and the towers left at their initialisation.

    Raises:
        ValueError: A tower the source holds does not fit (missing keys or shapes), or its settings differ.
    """
    own = target.state_dict()
    own_shapes = {k: tuple(v.shape) for k, v in own.items()}
    chosen: dict[str, Tensor] = {}
    loaded, kept = [], []
    unknown = set(towers) - {"visual", "text"}
    if unknown or not towers:
        raise ValueError(f"train.init_towers must name 'visual' and/or 'text', got {','.join(towers)!r}")
    for prefix in _TOWERS:
        mine = [k for k in own if k.startswith(prefix)]
        theirs = [k for k in state_dict if k.startswith(prefix)]
        if not mine:
            continue
        if prefix.split(".")[1] not in towers or not theirs:
            kept.append(prefix.rstrip("."))
            continue
        if run_cfg is not None:
            _check_settings(prefix, run_cfg, saved_cfg, where)
        problems = key_problems([k for k in mine if k not in state_dict], [k for k in theirs if k not in own],
                                shape_mismatches(state_dict, own_shapes, mine))
        if problems:
            raise ValueError(f"cannot start {prefix.rstrip('.')} from {where}: {problems}")
        chosen.update({k: state_dict[k] for k in mine})
        loaded.append(prefix.rstrip("."))
    projections = {"model.image_proj.": "model.visual", "model.text_proj.": "model.text"}
    for prefix in _OPTIONAL:
        if prefix in projections and projections[prefix] not in loaded:
            continue
        mine = [k for k in own if k.startswith(prefix)]
        fits = [k for k in mine if k in state_dict and state_dict[k].shape == own[k].shape]
        if mine and len(fits) == len(mine):
            chosen.update({k: state_dict[k] for k in fits})
            loaded.append(prefix.rstrip("."))
    if not chosen:
        raise ValueError(f"{where} holds no tower of this model (its keys look like: "
                         f"{listing(sorted(state_dict))})")
    target.load_state_dict(chosen, strict=False)
    return {"loaded": loaded, "kept": kept}


def init_from(target: nn.Module, path: str, run_cfg: RunConfig) -> dict[str, list[str]]:
    """Read ``path`` (any layout ``vlp-convert`` knows) and load its towers into ``target`` (a TrainStep)."""
    if not Path(path).expanduser().exists():
        raise ValueError(f"--init-from: {path} does not exist")
    from vlp_core.convert import read_checkpoint

    converted = read_checkpoint(str(Path(path).expanduser()))
    saved_cfg = to_dict(converted.config) if converted.config is not None else None
    where = f"{path} (layout {converted.layout})"
    towers = tuple(t.strip() for t in run_cfg.train.init_towers.split(",") if t.strip())
    parts = load_towers(target, converted.state_dict, where=where, run_cfg=run_cfg, saved_cfg=saved_cfg,
                        towers=towers)
    log.info("initialised from %s: loaded %s; left at initialisation: %s", where,
             ", ".join(parts["loaded"]), ", ".join(parts["kept"]) or "nothing")
    return parts
