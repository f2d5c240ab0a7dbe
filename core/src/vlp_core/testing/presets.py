"""Preset checks shared by every method's tests: full-size parameter counts on the meta device, and one real
training step of a reduced copy on CPU.

Usage (see also /work/notes/presets_checker.md)::

    from vlp_core.testing.presets import build_on_meta, count_parameters, reduced, one_step

    model, loss = build_on_meta(METHOD, "vit_b32")            # no memory, no weights, no data
    assert count_parameters(model, loss) == 151_277_313
    cfg = reduced(METHOD.preset("vit_b32"))                    # same component kinds, tiny sizes
    result = one_step(METHOD, cfg, tokenizer, tmp_path)        # shard -> adapter -> model -> loss -> AdamW

``build_on_meta`` builds under ``torch.device("meta")``: parameters have shapes but no storage, so a
ViT-L + 8B LLM costs nothing. ``one_step`` writes a tiny webdataset shard, reads it back through the
trainer's own pipeline (``WdsPipeline`` + the method's adapter), moves the batch as the trainer does
(normalising with ``model.vision.image_mean``/``image_std``), and takes one step with the trainer's
``TrainStep``, ``build_optimizer``/``build_scheduler`` and optimizer step (gradient clipping included). It
checks that the loss and its parts are finite, that every trainable parameter got a gradient and that every
parameter with a non-zero gradient changed.

Tokenizers that need the network (SigLIP's sentencepiece, Llama-3, sentence-transformers) are replaced in
tests by a local one of the same kind: :func:`tiny_tokenizer` trains a small Unigram (sentencepiece-like)
or byte-level BPE ``tokenizer.json`` with the named special tokens. :class:`TokenizerSpec` is the
id-only stand-in a meta build needs.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlp_core.config import RunConfig
from vlp_core.method import MethodSpec

__all__ = [
    "TokenizerSpec",
    "StepResult",
    "preset_config",
    "meta_tokenizer",
    "build_on_meta",
    "count_parameters",
    "parameter_shapes",
    "reduced",
    "one_step",
    "shapes_samples",
    "write_shard",
    "tiny_tokenizer",
    "load_tokenizer",
    "hf_from_config",
]

_TIMM_PATCH = re.compile(r"patch(\d+)")


@dataclass(frozen=True)
class TokenizerSpec:
    """The ids a model build needs, without any vocabulary (meta builds of presets whose tokenizer is not
    available offline; use the published vocabulary size)."""

    vocab_size: int
    pad_id: int
    eot_id: int
    bos_id: int | None = None


@dataclass
class StepResult:
    """What :func:`one_step` saw: the loss, its logged parts, and which parameters moved."""

    loss: float
    parts: dict[str, float]
    n_params: int
    changed: list[str] = field(default_factory=list)
    zero_grad: list[str] = field(default_factory=list)
    batch: dict[str, Any] = field(default_factory=dict)


def preset_config(method: MethodSpec, preset: str | RunConfig) -> RunConfig:
    """``method.preset(name)`` (method and preset names filled in) or a copy of a given config."""
    if isinstance(preset, RunConfig):
        return copy.deepcopy(preset)
    return method.preset(preset)


def load_tokenizer(cfg: RunConfig, source: str | Path | None = None) -> Any:
    """The core tokenizer for ``source`` (default: ``cfg.model.text.tokenizer``; empty = the shapes world's
    word-level tokenizer) at the config's context length."""
    from vlp_core.data.tokenizer import Tokenizer

    name = str(source) if source is not None else cfg.model.text.tokenizer
    if not name:  # shapes-world presets: the world's own word-level tokenizer
        name = str(_shapes_tokenizer_file())
    return Tokenizer.from_pretrained(name, context_length=cfg.model.text.context_length)


@functools.lru_cache(maxsize=1)
def _shapes_tokenizer_file() -> Path:
    """The shapes world's ``tokenizer.json`` (what ``generate_world`` writes), trained once per process."""
    import atexit
    import shutil
    import tempfile

    from vlp_core.data.synthetic import vocabulary_corpus
    from vlp_core.data.tokenizer import train_word_tokenizer

    folder = tempfile.mkdtemp(prefix="vlp-shapes-tok-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return train_word_tokenizer(vocabulary_corpus(), Path(folder) / "tokenizer.json")


def meta_tokenizer(cfg: RunConfig) -> Any:
    """Ids for a meta build: the real ``clip-bpe``, shapes-world or local tokenizer, else ``model.text.vocab_size`` with
    pad 0 / EOT = last id. A hub tokenizer without ``vocab_size`` set needs an explicit :class:`TokenizerSpec`."""
    name = cfg.model.text.tokenizer
    if not name or name == "clip-bpe" or Path(name).expanduser().exists():
        return load_tokenizer(cfg)
    v = cfg.model.text.vocab_size
    if v:
        return TokenizerSpec(vocab_size=v, pad_id=0, eot_id=v - 1)
    raise ValueError(
        f"preset {cfg.method}/{cfg.preset}: tokenizer {name!r} is not available offline and "
        "model.text.vocab_size is 0: pass tokenizer=TokenizerSpec(<published vocab size>, pad, eot, bos)"
    )


def build_on_meta(
    method: MethodSpec, preset: str | RunConfig, tokenizer: Any = None
) -> tuple[nn.Module, nn.Module]:
    """Build ``(model, loss)`` of a preset at full size on the meta device (shapes only, no storage).

    Args:
        method: The method's ``MethodSpec``.
        preset: A preset name of ``method`` or a ``RunConfig``.
        tokenizer: Anything with ``vocab_size``/``pad_id``/``eot_id``/``bos_id`` (default :func:`meta_tokenizer`).
    """
    cfg = preset_config(method, preset)
    cfg.validate()
    tok = tokenizer if tokenizer is not None else meta_tokenizer(cfg)
    with torch.device("meta"):
        model = method.build_model(cfg, tok)
        loss = method.build_loss(cfg)
    return model, loss


def count_parameters(model: nn.Module, loss: nn.Module | None = None, *, trainable_only: bool = False) -> int:
    """Parameters of the model plus the loss's (temperature, bias, method heads), each shared tensor once."""
    seen: set[int] = set()
    total = 0
    modules = [model] if loss is None else [model, loss]
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_shapes(*modules: nn.Module, transpose: Iterable[tuple[int, ...]] = ()) -> collections.Counter:
    """How often each parameter shape occurs in ``modules``, to compare a build with a reference implementation
    tensor by tensor up to layout.

    Size-1 dims are dropped (timm keeps ``cls_token`` as [1, 1, W] and ``pos_embed`` as [1, T, W]), and each
    shape in ``transpose`` is counted reversed (OpenCLIP stores projections as [W, E] matrices, ``nn.Linear``
    weights are [E, W]: pass ``((512, 768),)`` on both sides for a ViT-B with 512-dim embeddings).
    """
    out = collections.Counter(tuple(s for s in p.shape if s != 1) for m in modules for p in m.parameters())
    for shape in transpose:
        out[shape[::-1]] += out.pop(shape, 0)
    return out


def _timm_patch(cfg_v: Any) -> int:
    if "patch_size" in cfg_v.timm_kwargs:
        return int(cfg_v.timm_kwargs["patch_size"])
    m = _TIMM_PATCH.search(cfg_v.timm_name)
    return int(m.group(1)) if m else 16


def reduced(
    cfg: RunConfig, *, width: int = 32, depth: int = 2, heads: int = 2, grid: int = 2, context_length: int = 16,
    batch_size: int = 4,
) -> RunConfig:
    """A small copy of ``cfg`` that keeps every component kind.

    Kept: activation, norm eps, ``pre_norm``, class/extra tokens, pooling, stem, patch size, projections
    (kinds), mlp ratios, causal/mask_pads/pool of the text tower, the tokenizer name, ``timm_name`` (shrunk
    through ``timm_kwargs``), grad checkpointing and the whole loss section. Changed: both towers and the
    embedding to ``width`` (so ``none`` projections stay valid), ``depth`` blocks with ``heads`` heads, images
    of ``grid`` x ``grid`` patches, text ``context_length`` (if shorter), ``batch_size`` samples in one step
    of fp32 with no warm-up (full lr, so every parameter visibly moves), no pretrained weights, one worker-
    less loader. ``model.text.vocab_size`` is reset to 0 (the step's tokenizer sizes the embedding). Text
    towers of kind ``hf`` are left as they are (point ``hf_name`` at a tiny local model).
    """
    out = copy.deepcopy(cfg)
    v, t = out.model.vision, out.model.text
    if v.timm_name:
        patch = _timm_patch(v)
        v.timm_kwargs = {**v.timm_kwargs, "depth": depth, "embed_dim": width, "num_heads": heads}
    else:
        patch = v.patch_size
        v.width, v.depth, v.heads = width, depth, heads
    v.image_size = patch * grid
    v.pretrained = ""
    if t.kind == "clip":
        t.width, t.depth, t.heads = width, depth, heads
        t.context_length = min(t.context_length, context_length)
        t.vocab_size = 0
        t.pretrained = ""
    out.model.embed_dim = width
    out.train.batch_size, out.train.accum_steps, out.train.steps = batch_size, 1, 1
    out.train.precision, out.train.compile = "fp32", False
    out.optim.warmup_steps = 0
    out.data.workers, out.data.shuffle_buffer, out.data.augment = 0, 1, False
    return out


def shapes_samples(n: int, *, seed: int = 0, image_size: int = 64) -> list[dict[str, Any]]:
    """``n`` shapes-world training samples (``jpg``, ``txt``, ``json`` with raw/clean/long captions)."""
    from vlp_core.data.synthetic import make_train_sample

    return [make_train_sample(seed, i, image_size=image_size) for i in range(n)]


def write_shard(samples: Iterable[dict[str, Any]], folder: str | Path) -> str:
    """Write raw samples (``__key__`` + ``ext -> bytes | str``) into ``folder/00000.tar``; returns its path."""
    from vlp_core.data.tario import ShardWriter

    folder = Path(folder)
    with ShardWriter(str(folder / "%05d.tar"), max_count=1_000_000) as writer:
        for sample in samples:
            writer.write(sample)
    return str(folder / "00000.tar")


def _first_batch(cfg: RunConfig, adapter: Any, shard: str) -> dict[str, Any]:
    from vlp_core.data.wds import WdsPipeline, build_train_loader, parse_sources

    pipeline = WdsPipeline(parse_sources(shard), adapter, batch_size=cfg.train.batch_size, seed=cfg.data.seed,
                           shuffle_buffer=1, seed_samples=True, max_consecutive_skips=50)
    batch, _ = next(iter(build_train_loader(pipeline, workers=0)))
    return batch


def one_step(
    method: MethodSpec, cfg: RunConfig, tokenizer: Any, tmp_path: str | Path, *,
    samples: Sequence[dict[str, Any]] | None = None, allow_unused: Collection[str] = (),
    allow_unchanged: Collection[str] = (), prepare: Callable[[nn.Module, nn.Module], None] | None = None,
) -> StepResult:
    """One real training step of ``cfg`` (use :func:`reduced`) on CPU, through the trainer's own pieces.

    Args:
        method: The method.
        cfg: The (reduced) run config.
        tokenizer: A core ``Tokenizer`` (the preset's own, or a local one of the same kind).
        tmp_path: Scratch folder (the shard is written there).
        samples: Raw webdataset samples (default: ``train.batch_size`` shapes-world samples). Add the members
            the method's adapter reads (e.g. ``syn.txt``) here.
        allow_unused: Substrings of parameter names allowed to get no gradient.
        allow_unchanged: Substrings of parameter names allowed to have a zero gradient.
        prepare: Called with ``(model, loss)`` before the step (e.g. to freeze a part as the CLI does).

    Raises:
        AssertionError: Non-finite loss, a trainable parameter without gradient, or one that did not move.
    """
    from vlp_core.train.loop import TrainStep, _optimizer_step, _to_device
    from vlp_core.train.optim import build_optimizer, build_scheduler

    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    if samples is None:
        samples = shapes_samples(cfg.train.batch_size, seed=cfg.data.seed)
    shard = write_shard(samples, Path(tmp_path) / "one_step_shard")
    model = method.build_model(cfg, tokenizer)
    loss_module = method.build_loss(cfg)
    if prepare is not None:
        prepare(model, loss_module)
    step_module = TrainStep(model, loss_module).to(device)
    if cfg.train.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(step_module, cfg.optim, device=device)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps=cfg.train.steps)
    batch = _first_batch(cfg, method.build_adapter(cfg, tokenizer), shard)
    batch = _to_device(batch, device, mean=cfg.model.vision.image_mean, std=cfg.model.vision.image_std)
    trainable = {n: p for n, p in step_module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    step_module.train()
    optimizer.zero_grad(set_to_none=True)
    out = step_module(batch)
    assert torch.isfinite(out.loss).all(), f"{cfg.method}/{cfg.preset}: non-finite loss {out.loss}"
    out.loss.backward()
    parts = {"loss": out.loss.detach(), **{k: v.detach() for k, v in out.parts.items()}}
    bad_parts = {k: v for k, v in parts.items() if v.is_floating_point() and not torch.isfinite(v).all()}
    assert not bad_parts, f"{cfg.method}/{cfg.preset}: non-finite loss parts {bad_parts}"
    nonfinite = torch.zeros((), device=device)
    _optimizer_step(step_module, optimizer, None, cfg.train.grad_clip, nonfinite, parts)
    scheduler.step()
    no_grad = [n for n, p in trainable.items() if p.grad is None and not any(a in n for a in allow_unused)]
    assert not no_grad, f"{cfg.method}/{cfg.preset}: trainable parameters without gradient: {no_grad[:8]}"
    zero = [n for n, p in trainable.items() if p.grad is not None and not p.grad.any()]
    changed = [n for n, p in trainable.items() if not torch.equal(p.detach(), before[n])]
    stuck = [n for n, p in trainable.items()
             if p.grad is not None and p.grad.any() and n not in changed]
    assert not stuck, f"{cfg.method}/{cfg.preset}: parameters with a gradient that did not change: {stuck[:8]}"
    zero_bad = [n for n in zero if not any(a in n for a in allow_unchanged)]
    assert not zero_bad, f"{cfg.method}/{cfg.preset}: parameters with an all-zero gradient: {zero_bad[:8]}"
    return StepResult(
        loss=float(out.loss.detach()), parts={k: float(v) for k, v in parts.items() if v.numel() == 1},
        n_params=count_parameters(model, loss_module), changed=changed, zero_grad=zero, batch=batch,
    )


def tiny_tokenizer(
    folder: str | Path, *, kind: str = "unigram", specials: Sequence[str] = ("<pad>", "</s>", "<unk>"),
    texts: Iterable[str] | None = None, vocab_size: int = 300,
) -> Path:
    """Train a small local tokenizer of a hub tokenizer's kind and save it as ``folder/tokenizer.json``.

    Args:
        folder: Output folder (load it with ``Tokenizer.from_pretrained(str(folder), ...)``).
        kind: ``"unigram"`` (sentencepiece-like: SigLIP, T5) or ``"bpe"`` (byte-level BPE: Llama-3, GPT-2).
        specials: Special tokens, in id order from 0 (the core finds BOS/EOT/pad among the usual spellings,
            e.g. ``<s>``/``</s>``/``<pad>``, ``<|begin_of_text|>`` is not one of them: use ``<s>``).
        texts: Training texts (default: the shapes world's vocabulary corpus).
        vocab_size: Target vocabulary size.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if texts is None:
        from vlp_core.data.synthetic import vocabulary_corpus

        texts = vocabulary_corpus()
    texts = list(texts)
    if kind == "unigram":
        unk = next((s for s in specials if "unk" in s.lower()), None)
        tok = tokenizers.Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(specials), unk_token=unk,
                                          show_progress=False)
    elif kind == "bpe":
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        raise ValueError(f"tiny_tokenizer kind must be 'unigram' or 'bpe', got {kind!r}")
    tok.train_from_iterator(texts, trainer=trainer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


_HF_LOAD_KWARGS = ("attn_implementation", "dtype", "torch_dtype", "trust_remote_code")


@contextlib.contextmanager
def hf_from_config() -> Iterator[None]:
    """Inside, ``AutoModel`` / ``AutoModelForCausalLM`` ``.from_pretrained(folder)`` build from the folder's
    ``config.json`` alone (``from_config``: random weights, or none under ``torch.device("meta")``).

    For meta builds of presets with a transformers tower: write the published config (e.g.
    ``LlamaConfig(...)``) with ``save_pretrained`` into a folder, point the preset at it and build inside.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    saved = {cls: cls.__dict__["from_pretrained"] for cls in (AutoModel, AutoModelForCausalLM)
             if "from_pretrained" in cls.__dict__}

    def _from_config(cls: Any, name: Any, *args: Any, **kwargs: Any) -> Any:
        keep = {k: v for k, v in kwargs.items() if k in _HF_LOAD_KWARGS}
        return cls.from_config(AutoConfig.from_pretrained(name), **keep)

    try:
        for cls in (AutoModel, AutoModelForCausalLM):
            cls.from_pretrained = classmethod(_from_config)  # type: ignore[method-assign, assignment]
        yield
    finally:
        for cls in (AutoModel, AutoModelForCausalLM):
            if cls in saved:
                cls.from_pretrained = saved[cls]  # type: ignore[method-assign]
            else:
                del cls.from_pretrained
