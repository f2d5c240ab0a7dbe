"""Building the vlp model a converted checkpoint belongs to, and checking a state dict against it.

- :func:`load_methods` imports every installed method (entry-point group ``vlp.methods``), so method
  packages can register their own readers/writers and their config classes are known.
- :func:`run_config_from_dict` turns a saved config dict back into a ``RunConfig`` (the method's own loss
  dataclass included).
- :func:`build_train_step` builds ``TrainStep(model, loss)`` from a config, without needing the tokenizer
  files for ``clip-bpe`` (a stand-in with OpenAI's ids is used); :func:`build_loaded` builds it holding a
  checkpoint's weights (built on ``meta`` and assigned: no random initialisation).
- :func:`check_state_dict` compares a converted state dict with the model it must load into (built on the
  ``meta`` device: no memory, no initialisation cost) and names missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vlp_core.config import RunConfig, from_dict
from vlp_core.convert.registry import ConversionError, Converted, key_problems, shape_mismatches

__all__ = [
    "load_methods",
    "method_spec",
    "run_config_from_dict",
    "model_tokenizer",
    "build_train_step",
    "build_loaded",
    "check_state_dict",
    "check_converted",
]

log = logging.getLogger("vlp")
# OpenAI's BPE as shipped in vlp-core ("clip-bpe"): start/end of text and padding ids.
_CLIP_BPE = {"vocab_size": 49408, "bos_id": 49406, "eot_id": 49407, "pad_id": 0}
_loaded: dict[str, Any] = {}


def load_methods() -> dict[str, Any]:
    """Import every ``vlp.methods`` entry point once; returns name -> ``MethodSpec``.

    A package that fails to import is skipped with a warning (its layouts are then unavailable).
    """
    if _loaded:
        return _loaded
    from importlib.metadata import entry_points

    for ep in entry_points(group="vlp.methods"):
        try:
            _loaded[ep.name] = ep.load()
        except Exception as e:  # noqa: BLE001 - one broken package must not stop the others
            log.warning("method %r (%s) could not be imported: %s", ep.name, ep.value, e)
    return _loaded


def method_spec(name: str) -> Any:
    methods = load_methods()
    if name not in methods:
        raise ConversionError(f"unknown method {name!r} (installed: {', '.join(sorted(methods))})")
    return methods[name]


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A ``RunConfig`` from a saved config dict: the method's default preset, then every saved value on top."""
    if not isinstance(data, dict):
        raise ConversionError(f"a saved run config must be a mapping, got {type(data).__name__}")
    method = method_spec(str(data.get("method", "clip")))
    preset = data.get("preset")
    cfg = method.preset(preset if preset in method.presets else method.default_preset)
    from_dict(cfg, data)
    return cfg


@dataclass(frozen=True)
class _TokenizerIds:
    """What ``build_model`` needs from a tokenizer, without its files."""

    vocab_size: int
    pad_id: int
    eot_id: int
    bos_id: int | None


def model_tokenizer(cfg: RunConfig, *, shapes_only: bool = False, fallback_vocab: int = 0) -> Any:
    """The ids ``build_model`` needs: OpenAI's BPE ids for ``clip-bpe``, else the tokenizer itself.

    ``model.text.vocab_size`` (set by every reader) sizes the embedding, so no vocabulary file is read for
    ``clip-bpe``. Other tokenizers are loaded with ``Tokenizer.from_pretrained`` (local or cached files).

    Args:
        cfg: The run config.
        shapes_only: Only the parameter shapes matter (a ``meta`` build for checking keys): when the
            vocabulary size is known (``model.text.vocab_size``, else ``fallback_vocab``, e.g. the rows of the
            checkpoint's token embedding) a stand-in with that many ids is returned without loading anything.
        fallback_vocab: See ``shapes_only``.
    """
    t = cfg.model.text
    if t.tokenizer == "clip-bpe":
        ids = dict(_CLIP_BPE)
        if t.vocab_size:
            ids["vocab_size"] = min(t.vocab_size, ids["vocab_size"])
        return _TokenizerIds(**ids)
    vocab = t.vocab_size or fallback_vocab
    if shapes_only and vocab:
        return _TokenizerIds(vocab_size=vocab, pad_id=0, eot_id=vocab - 1, bos_id=None)
    from vlp_core.data.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(t.tokenizer, context_length=t.context_length)


def build_train_step(
    cfg: RunConfig, *, device: str | torch.device | None = None, fallback_vocab: int = 0, tokenizer: Any = None
) -> nn.Module:
    """``TrainStep(build_model(cfg, tokenizer), build_loss(cfg))`` of ``cfg.method`` (randomly initialised).

    Args:
        cfg: The run config (e.g. from :func:`run_config_from_dict`).
        device: Where to create the parameters; ``"meta"`` builds shapes only (and needs no tokenizer files
            when the vocabulary size is known, see :func:`model_tokenizer`).
        fallback_vocab: See :func:`model_tokenizer`.
        tokenizer: The tokenizer (ids) to build with; None = :func:`model_tokenizer`.
    """
    from vlp_core.train.loop import TrainStep

    method = method_spec(cfg.method)
    if tokenizer is None:
        tokenizer = model_tokenizer(cfg, shapes_only=str(device) == "meta", fallback_vocab=fallback_vocab)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return TrainStep(method.build_model(cfg, tokenizer), method.build_loss(cfg))


def build_loaded(cfg: RunConfig, state_dict: dict[str, Tensor], *, device: str | torch.device = "cpu") -> nn.Module:
    """The ``TrainStep`` of ``cfg`` holding ``state_dict``, without paying for a random initialisation.

    The model is built on the ``meta`` device and the checked weights are assigned (cast to each parameter's
    dtype); a model with non-persistent buffers is built normally instead and loaded.

    Raises:
        ConversionError: The weights do not fit the model (see :func:`check_state_dict`).
    """
    check_state_dict(state_dict, cfg, layout="vlp")
    tokenizer = model_tokenizer(cfg)  # the real ids: the text tower pools at the end-of-text token
    step = build_train_step(cfg, device="meta", tokenizer=tokenizer)
    own = step.state_dict()
    step.load_state_dict({k: v.to(device=device, dtype=own[k].dtype) for k, v in state_dict.items()},
                         strict=True, assign=True)
    if any(t.is_meta for t in (*step.parameters(), *step.buffers())):
        step = build_train_step(cfg, device=device, tokenizer=tokenizer)
        step.load_state_dict(state_dict, strict=True)
    return step


IMAGE_ONLY_MAY_LACK = ("model.text.", "model.text_proj.", "loss.")


def is_image_only(state_dict: dict[str, Tensor]) -> bool:
    """A converted checkpoint that holds the image tower alone (see :func:`check_state_dict`)."""
    return not any(k.startswith("model.text.") for k in state_dict)


def check_state_dict(state_dict: dict[str, Tensor], cfg: RunConfig, *, layout: str) -> None:
    """Require ``state_dict`` to load strictly into the model ``cfg`` builds (same keys, same shapes).

    One exception: an **image-tower-only** checkpoint (no ``model.text.*`` key at all, e.g. an EVA02 tower
    released on its own) may lack the text tower, the text projection and the loss values; such a file
    serves ``--init-from`` (and LLM2CLIP's vision towers), not evaluation.

    Raises:
        ConversionError: Naming the layout and the first few missing / unexpected / mis-shaped keys.
    """
    embedding = state_dict.get("model.text.token_embedding.weight")
    vocab = int(embedding.shape[0]) if embedding is not None and embedding.ndim == 2 else 0
    try:
        model = build_train_step(cfg, device="meta", fallback_vocab=vocab)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - a config the model builder rejects
        raise ConversionError(f"{layout}: cannot build the vlp model of the converted config: {e}") from None
    missing = [k for k in expected if k not in state_dict]
    if not any(k.startswith("model.text.") for k in state_dict):
        missing = [k for k in missing if not k.startswith(IMAGE_ONLY_MAY_LACK)]
    unexpected = [k for k in state_dict if k not in expected]
    problems = key_problems(missing, unexpected, shape_mismatches(state_dict, expected, expected))
    if problems:
        raise ConversionError(f"{layout} -> vlp: the converted weights do not fit the model: {problems}")


def check_converted(converted: Converted) -> None:
    """:func:`check_state_dict` of a reader's output."""
    check_state_dict(converted.state_dict, converted.config, layout=converted.layout)


def as_clip(converted: Converted) -> Converted:
    """A method's checkpoint as the CLIP baseline's, for the writers of foreign formats (``hf``, ``open_clip``).

    Methods whose model is the core's dual encoder (ALIP, DreamLIP) keep their temperature (and bias) in their
    own loss module (``loss.logit_scale``) next to method state (ALIP's running averages, DreamLIP's local
    scale) that no foreign format has a place for. The dual encoder's weights and the temperature/bias are
    kept; the rest of ``loss.*`` is dropped with a log line. A model with more than the dual encoder (Llip's
    cross-attention, LCL's language model, LLM2CLIP's adapter) stops with an error naming what does not fit.
    """
    import copy

    from vlp_core.clip.config import ClipConfig

    cfg = converted.config
    if cfg.method == "clip":
        return converted
    sd = converted.state_dict
    found = {name: next((sd[k] for k in (f"loss.loss.{name}", f"loss.{name}") if k in sd), None)
             for name in ("logit_scale", "logit_bias")}
    if found["logit_scale"] is None:
        raise ConversionError(f"{cfg.method} checkpoint: no logit scale (loss.logit_scale) to export")
    state = {k: v for k, v in sd.items() if k.startswith("model.")}
    state.update({f"loss.loss.{name}": v for name, v in found.items() if v is not None})
    clip_cfg = copy.deepcopy(cfg)
    clip_cfg.method, clip_cfg.preset = "clip", "custom"
    clip_cfg.loss = ClipConfig(kind="siglip" if found["logit_bias"] is not None else "infonce",
                               max_logit_scale=float(getattr(cfg.loss, "max_logit_scale", 100.0)))
    try:
        check_state_dict(state, clip_cfg, layout=converted.layout)
    except ConversionError as e:
        raise ConversionError(
            f"a {cfg.method} model is not a CLIP dual encoder, so only --to vlp can hold it ({e})"
        ) from None
    dropped = sorted(k for k in sd if k.startswith("loss.") and k.split(".")[-1] not in found)
    if dropped:
        log.info("exporting %s's dual encoder as a CLIP model; method state not exported: %s", cfg.method,
                 ", ".join(dropped))
    return Converted(state_dict=state, config=clip_cfg, layout=converted.layout, step=converted.step)
