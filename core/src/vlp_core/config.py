"""Run configuration: dataclass trees, YAML round trip and ``--set key=value`` overrides.

A run is one :class:`RunConfig`. Presets are plain functions returning a fresh ``RunConfig``; a variant calls
its base and changes a few fields. Overrides walk the dataclass fields, coerce each value by its type hint
and reject unknown keys with a did-you-mean hint.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "VisionConfig",
    "TextConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "RunConfig",
    "apply_overrides",
    "to_dict",
    "from_dict",
    "load_yaml",
    "dump_yaml",
]


@dataclass(kw_only=True)
class VisionConfig:
    """Image tower. ``timm_name`` picks any timm ViT; empty builds one from the explicit size below."""

    timm_name: str = ""
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    class_token: bool = True
    # Learnable prefix tokens after the class token (Llip mixture tokens, registers).
    extra_tokens: int = 0
    # "map": timm's attention-pool head over the normed tokens (SigLIP's MAP head).
    pool: Literal["token", "avg", "none", "map"] = "token"
    # Explicit build only (timm_name models keep their own): the MLP activation (OpenAI CLIP uses
    # "quick_gelu", SigLIP "gelu_tanh"), a LayerNorm after the patch embedding ("ln_pre", CLIP), and the
    # LayerNorm epsilon (CLIP 1e-5, timm/SigLIP 1e-6).
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    pre_norm: bool = False
    norm_eps: float = 1e-6
    # Extra keyword arguments for timm.create_model with timm_name (e.g. {'depth': 2} for a reduced copy).
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Image preprocessing: per-channel mean/std in [0, 1] units and the resize interpolation.
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    # "patch": the usual linear patch embedding; "conv": a stack of stride-2 3x3 convolutions with the same
    # total stride (early convolutions: much better sample efficiency on small data, Xiao et al. 2021).
    stem: Literal["patch", "conv"] = "patch"
    pretrained: str = ""
    drop_path: float = 0.0

    def validate(self) -> None:
        _require(self.image_size > 0, "model.vision.image_size", self.image_size, "> 0")
        if not self.timm_name:  # a timm model keeps its own sizes
            for key in ("patch_size", "width", "heads"):
                _require(getattr(self, key) > 0, f"model.vision.{key}", getattr(self, key), "> 0")
            _require(self.depth >= 0, "model.vision.depth", self.depth, ">= 0")
        _require(self.extra_tokens >= 0, "model.vision.extra_tokens", self.extra_tokens, ">= 0")
        if not self.timm_name and self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch {self.patch_size}")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"vision.stem='conv' needs a power-of-two patch_size, got {self.patch_size}")
        if not self.timm_name and self.width % self.heads:
            raise ValueError(f"vision.width {self.width} is not divisible by vision.heads {self.heads}")


@dataclass(kw_only=True)
class TextConfig:
    """Text tower: ``clip`` (causal transformer, end-of-text pooling) or ``hf`` (any transformers AutoModel)."""

    kind: Literal["clip", "hf"] = "clip"
    hf_name: str = ""
    # "clip-bpe" (OpenAI's BPE, shipped with vlp-core), a transformers name or folder, or a tokenizer.json.
    # Empty: only for shapes-world data (the world folder's own tokenizer.json); any other data needs it.
    tokenizer: str = ""
    # Rows of the token embedding; 0 = the tokenizer's vocabulary size. Converted checkpoints record it
    # (e.g. 49408 for CLIP), and a tokenizer with more ids than this is an error.
    vocab_size: int = 0
    context_length: int = 32
    width: int = 128
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = True
    # Non-causal towers only: keep pads out of attention (False: attend to every position, as SigLIP does).
    mask_pads: bool = True
    # "eot": the first end-of-text token; "last": the last position (SigLIP); "mean"; "first".
    pool: Literal["eot", "mean", "first", "last"] = "eot"
    act: Literal["gelu", "quick_gelu", "gelu_tanh"] = "gelu"
    norm_eps: float = 1e-5
    pretrained: str = ""

    def validate(self) -> None:
        _require(self.context_length > 0, "model.text.context_length", self.context_length, "> 0")
        _require(self.vocab_size >= 0, "model.text.vocab_size", self.vocab_size, ">= 0 (0: the tokenizer's)")
        if self.kind == "clip":
            for key in ("width", "heads"):
                _require(getattr(self, key) > 0, f"model.text.{key}", getattr(self, key), "> 0")
            _require(self.depth >= 0, "model.text.depth", self.depth, ">= 0")
        if self.kind == "hf" and not self.hf_name:
            raise ValueError("text.kind='hf' needs text.hf_name (a transformers model name or local path)")
        if self.kind == "clip" and self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads {self.heads}")


@dataclass(kw_only=True)
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 128
    # Projection of each tower's pooled feature into the shared space: "linear" (bias-free, CLIP),
    # "linear_bias" (EVA-CLIP's image head, SigLIP's text head) or "none" (width must equal embed_dim).
    image_proj: Literal["linear", "linear_bias", "none"] = "linear"
    text_proj: Literal["linear", "linear_bias", "none"] = "linear"


@dataclass(kw_only=True)
class DataConfig:
    """Training data. ``train_data`` is a brace pattern of shards; several sources are joined with ``::``."""

    train_data: str = ""  # empty = the shapes world, generated into ``world_dir`` if absent
    train_weights: str = ""  # one weight per source, joined with ``::``
    resampled: bool = False
    world_dir: str = ""  # empty = $VLP_CACHE or ~/.cache/vlp, then shapes-<world_seed>
    world_seed: int = 0
    world_train_samples: int = 20000
    world_noise: float = 0.0  # fraction of wrong or unrelated raw captions
    workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    augment: bool = False
    # Paper presets: an empty train_data is an error (it would otherwise mean the shapes-world demo).
    require_train_data: bool = False
    # Images whose header declares more pixels than this are skipped unread (counted as bad_image), as are
    # PIL's decompression bombs; 0 = PIL's own limit only.
    max_image_pixels: int = 89_478_485
    # A source stops the run once this many of its shard opens fail in a row (missing, corrupt, failing pipe).
    max_shard_failures: int = 50


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # global batch, over all ranks and accumulation steps
    accum_steps: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    output_dir: str = ""  # empty = runs/<method>-<preset>
    resume: str = ""  # "", "latest" or a checkpoint path
    # Start the towers from these weights (any layout vlp-convert reads); fresh optimizer, step 0.
    init_from: str = ""
    # Which towers --init-from loads ("visual", "text" or both, comma-separated); the others keep their init.
    init_towers: str = "visual,text"
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    image_grid_every: int = 500
    eval_every: int = 0  # 0 = only at the end
    nan_guard: int = 5  # consecutive non-finite steps tolerated (skipped) before stopping
    progress: bool = True
    # Data parallelism: DDP (replicated), FSDP2 (fully_shard per tower block, then the model + loss), or HSDP
    # (a 2-D mesh: replicate x shard; hsdp_replicate groups, 0 = one per node of LOCAL_WORLD_SIZE ranks).
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    hsdp_replicate: int = 0
    # "file": one step_XXXXXXXX.pt written by rank 0; "dcp": a torch.distributed.checkpoint folder that
    # every rank writes its shards into (resharded on resume); "auto": dcp under fsdp/hsdp, else file.
    checkpoint_format: Literal["auto", "file", "dcp"] = "auto"
    async_save: bool = False  # dcp only: write in a background thread, finalised before the next save
    # Collective timeout of the process group: a rank that waits this long on a dead peer stops with a message.
    dist_timeout_s: float = 600.0
    # A checkpoint write that fails (disk full...): "stop" every rank with one message, or "warn" and go on.
    on_save_error: Literal["stop", "warn"] = "stop"
    # A resume whose data settings differ from the checkpoint's: warn (false) or stop (true).
    strict_resume: bool = False


@dataclass(kw_only=True)
class EvalConfig:
    data: str = ""  # folder with the shapes world's eval sets; empty = the training world's
    zeroshot: str = "zeroshot_shape,zeroshot_color,zeroshot_color_shape"
    retrieval: str = "retrieval"
    compositional: str = "compositional"
    # Zero-shot sets whose images also fit a linear probe on the frozen image tower (``model.visual``; patch mean
    # + class token, float64 L-BFGS, every 3rd image held out): "<set>/probe_top1". Empty: none.
    linear_probe: str = ""
    imagefolder: str = ""  # an ImageFolder root for extra zero-shot classification (ImageNet wnid folders too)
    # CLIP_benchmark webdataset sets: folders joined with ',' (each optionally 'name=folder').
    wds: str = ""
    batch_size: int = 256
    at_end: bool = True


@dataclass(kw_only=True)
class RunConfig:
    method: str = "clip"
    preset: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The method's own dataclass (e.g. ``ClipConfig``); its type decides which keys ``--set loss.x=`` accepts.
    loss: Any = None

    def validate(self) -> None:
        """Reject values that would crash or misbehave later (after the model is built, or steps into a run).

        Each error is one line naming the key and its value (the CLIs print it without a traceback).
        """
        self.model.vision.validate()
        self.model.text.validate()
        _require(self.model.embed_dim > 0, "model.embed_dim", self.model.embed_dim, "> 0")
        t = self.train
        if t.batch_size <= 0 or t.steps <= 0:
            raise ValueError(f"train.batch_size ({t.batch_size}) and train.steps ({t.steps}) must be positive")
        _require(t.accum_steps > 0, "train.accum_steps", t.accum_steps, "> 0")
        if t.batch_size % t.accum_steps:
            raise ValueError(f"train.batch_size {t.batch_size} is not divisible by accum_steps {t.accum_steps}")
        # Intervals: the loop takes ``step % every``; the optional ones use 0 for off.
        _require(t.save_every > 0, "train.save_every", t.save_every, "> 0 (steps between checkpoints)")
        _require(t.log_every > 0, "train.log_every", t.log_every, "> 0 (steps between log lines)")
        _require(t.eval_every >= 0, "train.eval_every", t.eval_every, ">= 0 (0: evaluate at the end only)")
        _require(t.image_grid_every >= 0, "train.image_grid_every", t.image_grid_every, ">= 0 (0: off)")
        _require(t.keep_checkpoints >= 0, "train.keep_checkpoints", t.keep_checkpoints, ">= 0 (0: keep all)")
        _require(t.nan_guard >= 0, "train.nan_guard", t.nan_guard,
                 ">= 0 (consecutive non-finite steps skipped before stopping)")
        _require(t.hsdp_replicate >= 0, "train.hsdp_replicate", t.hsdp_replicate, ">= 0 (0: one group per node)")
        _require(math.isfinite(t.dist_timeout_s) and t.dist_timeout_s > 0, "train.dist_timeout_s",
                 t.dist_timeout_s, "a finite number of seconds > 0")
        _require(math.isfinite(t.grad_clip), "train.grad_clip", t.grad_clip, "finite (<= 0: no clipping)")
        d = self.data
        _require(d.workers >= 0, "data.workers", d.workers, ">= 0 (0: load in the training process)")
        _require(d.shuffle_buffer >= 0, "data.shuffle_buffer", d.shuffle_buffer, ">= 0 (0 or 1: no shuffling)")
        _require(d.max_image_pixels >= 0, "data.max_image_pixels", d.max_image_pixels, ">= 0 (0: PIL's limit only)")
        _require(d.max_shard_failures > 0, "data.max_shard_failures", d.max_shard_failures, "> 0")
        _require(d.world_train_samples > 0, "data.world_train_samples", d.world_train_samples, "> 0")
        _require(0.0 <= d.world_noise <= 1.0, "data.world_noise", d.world_noise, "in [0, 1]")
        o = self.optim
        _require(o.lr >= 0, "optim.lr", o.lr, ">= 0")
        _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
        _require(0.0 <= o.beta1 < 1.0, "optim.beta1", o.beta1, "in [0, 1)")
        _require(0.0 <= o.beta2 < 1.0, "optim.beta2", o.beta2, "in [0, 1)")
        _require(o.eps > 0, "optim.eps", o.eps, "> 0")
        _require(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, ">= 0")
        _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]")
        _require(self.eval.batch_size > 0, "eval.batch_size", self.eval.batch_size, "> 0")
        if hasattr(self.loss, "validate"):
            self.loss.validate()


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    """One-line error naming the key and its value (NaN fails every comparison, so it is rejected too)."""
    if not ok:
        raise ValueError(f"{key} must be {rule}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# dict / YAML


def to_dict(cfg: Any) -> Any:
    """Plain-dict view of a dataclass tree (recursively)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(key: str, options: list[str], where: str) -> ValueError:
    close = difflib.get_close_matches(key.split(".")[-1], options, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(options))}"
    return ValueError(f"unknown config key '{key}' in {where}{hint}")


def from_dict(cfg: Any, data: dict, *, prefix: str = "") -> Any:
    """Update dataclass ``cfg`` in place from a nested dict; unknown keys raise ``ValueError``."""
    hints = _field_types(type(cfg))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(path, list(hints), type(cfg).__name__)
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            from_dict(current, value, prefix=f"{path}.")
        elif value is None and current is not None and dataclasses.is_dataclass(current):
            raise ValueError(f"config key '{path}' cannot be null")
        else:
            setattr(cfg, key, _coerce(value, hints[key], path) if not isinstance(value, dict) else value)
    return cfg


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping at the top level")
    return data


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------
# overrides


def _coerce(raw: Any, hint: Any, key: str) -> Any:
    """Coerce ``raw`` (a string from the command line, or a YAML value) to the type ``hint``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return raw
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise ValueError(f"config key '{key}' must be one of {list(choices)}, got {raw!r}")
        return raw
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw in (None, "None", "null") and len(args) < len(typing.get_args(hint)):
            return None
        return _coerce(raw, args[0], key)
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        s = str(raw).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key '{key}' expects a boolean, got {raw!r}")
    if hint in (int, float):
        try:
            value = hint(raw) if not isinstance(raw, str) else hint(ast.literal_eval(raw.replace("_", "")))
        except (ValueError, SyntaxError, TypeError):
            raise ValueError(f"config key '{key}' expects {hint.__name__}, got {raw!r}") from None
        if hint is int and isinstance(raw, str) and float(ast.literal_eval(raw)) != value:
            raise ValueError(f"config key '{key}' expects an integer, got {raw!r}")
        return value
    if hint is str:
        return str(raw)
    if origin in (list, tuple, dict) or hint in (list, tuple, dict):
        value = ast.literal_eval(raw) if isinstance(raw, str) else raw
        return (origin or hint)(value)
    return raw


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply ``a.b=value`` strings to the dataclass tree ``cfg`` in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            hints = _field_types(type(node))
            if part not in hints:
                raise _unknown_key(".".join(parts[: i + 1]), list(hints), type(node).__name__)
            if i == len(parts) - 1:
                setattr(node, part, _coerce(raw, hints[part], key))
            else:
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    raise ValueError(f"config key '{'.'.join(parts[: i + 1])}' is a value, not a section")
    return cfg
