"""The caption embedder: a transformers LLM (decoder made bidirectional, or an encoder) + masked mean pooling.

Shape legend: B batch, L sequence length, D hidden size.

Bidirectional attention: every attention module gets ``is_causal = False`` and the model receives a 4-D
additive mask built from padding only (``[B, 1, L, L]``: 0 where the key is a real token, the dtype's
minimum where it is padding). transformers passes a prepared 4-D mask through unchanged, and its SDPA path
only turns on ``is_causal`` when no mask is given, so the attention really is bidirectional under SDPA and
eager attention, with or without padding (the pitfall of setting ``is_causal=False`` alone; see the spec).

Pooling: the mean of the final hidden states (after the final norm) over the *pool mask*, in float32. The pool
mask marks the caption tokens and the closing end-of-text token; BOS and any instruction prefix are attended
to but not pooled (LLM2Vec's ``embed_mask``). Padding may sit on either side; position ids count real tokens
only, so left and right padding give the same embedding.

Token layout produced here (the core tokenizer's, right padded): ``[BOS] [instruction ids] caption ids [EOT]
pad ...``. The instruction and the caption are tokenized separately and concatenated, so the pool mask is
exact by construction (no tail re-tokenization, no off-by-one at the boundary).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EncoderSettings", "LlmEncoder", "hidden_states", "padding_only_mask", "masks_from_tokens", "tokenize",
           "assemble_rows", "instruct_rows", "load_encoder", "save_encoder", "SETTINGS_FILE", "LLM_DTYPES",
           "resolve_llm_dtype", "dtype_kwargs", "trim_rows", "set_layer_checkpointing", "decoder_layers"]

SETTINGS_FILE = "llm2clip.json"
LLM_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_llm_dtype(name: str, precision: str = "auto", *, cuda: bool | None = None) -> torch.dtype:
    """The dtype the text model's weights are loaded in (``loss.llm_dtype``), never left to transformers.

    ``"auto"``: bfloat16 when the run computes on CUDA (``cuda``, default: CUDA is available) unless
    ``train.precision`` is ``fp32``; float32 on the CPU. ``"bf16"``/``"fp32"``: as named.
    """
    if name == "auto":
        cuda = torch.cuda.is_available() if cuda is None else cuda
        return torch.bfloat16 if cuda and precision != "fp32" else torch.float32
    if name not in LLM_DTYPES:
        raise ValueError(f"loss.llm_dtype must be auto, bf16 or fp32, got {name!r}")
    return LLM_DTYPES[name]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``/``from_config`` keyword for ``dtype``: ``dtype`` (transformers >= 4.56), else the
    older ``torch_dtype``."""
    import transformers
    from packaging.version import Version

    new = Version(transformers.__version__.split("+")[0]) >= Version("4.56")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers of a transformers model (or a peft wrapper): its largest list of identical
    modules (``layers``, ``layer``, ``h``), the unit FSDP2 shards and checkpointing wraps."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1 \
                and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


def set_layer_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Non-reentrant activation checkpointing of every layer of a transformers model (or a peft wrapper):
    ``activation_checkpointing_enable`` (transformers >= 5), else ``gradient_checkpointing_enable``."""
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def trim_rows(batch: dict[str, Tensor], prefixes: tuple[str, ...] = ("",)) -> dict[str, Tensor]:
    """Cut the ``<prefix>tokens``/``attention``/``pool``/``labels`` rows of ``batch`` (right padded) to the
    longest real row among all of them (at least 1 column): no fixed padding to the context length."""
    keys = [f"{p}{k}" for p in prefixes for k in ("tokens", "attention", "pool", "labels") if f"{p}{k}" in batch]
    lengths = [int(batch[f"{p}attention"].sum(dim=1).max()) for p in prefixes
               if f"{p}attention" in batch and batch[f"{p}attention"].numel()]
    width = max([1, *lengths])
    return {**batch, **{k: batch[k][:, :width].contiguous() for k in keys}}


@dataclass(kw_only=True)
class EncoderSettings:
    """How a saved text model embeds captions; stored beside its weights as ``llm2clip.json``."""

    version: int = 1
    pooling: str = "mean"
    pool_bos: bool = False  # pool the BOS/CLS token too (sentence-transformers' MiniLM was trained so)
    bidirectional: bool = True  # only meaningful for decoder LLMs; encoders are bidirectional anyway

    @classmethod
    def read(cls, folder: str | Path) -> EncoderSettings:
        path = Path(folder) / SETTINGS_FILE
        if not path.is_file():
            return cls()
        data = json.loads(path.read_text())
        unknown = set(data) - set(asdict(cls()))
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        return cls(**data)


def padding_only_mask(attention_BL: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 1, L, L] additive mask: every query sees every real key, no query sees a padding key."""
    keep_B11L = attention_BL.to(torch.bool)[:, None, None, :]
    mask = torch.zeros(keep_B11L.shape, dtype=dtype, device=attention_BL.device)
    mask = mask.masked_fill(~keep_B11L, torch.finfo(dtype).min)
    length = attention_BL.shape[1]
    return mask.expand(-1, 1, length, length)


def masks_from_tokens(tokens_BL: Tensor, *, bos_id: int | None, eot_id: int, pool_bos: bool) -> tuple[Tensor, Tensor]:
    """Attention and pool masks [B, L] for right-padded core-tokenizer rows ``[BOS] ids [EOT] pad...``.

    Real tokens run up to the first EOT (pad may equal EOT). Without ``pool_bos`` position 0 (BOS) is not pooled.
    """
    is_eot_BL = tokens_BL == eot_id
    if bos_id is not None:
        is_eot_BL[:, 0] = False  # BOS may equal EOT (GPT-2 style)
    last_B = is_eot_BL.int().argmax(dim=1)
    pos_L = torch.arange(tokens_BL.shape[1], device=tokens_BL.device)
    attention_BL = pos_L[None, :] <= last_B[:, None]
    pool_BL = attention_BL.clone()
    if bos_id is not None and not pool_bos:
        pool_BL[:, 0] = False
    return attention_BL, pool_BL


def tokenize(tokenizer: Any, texts: list[str], instructions: list[str] | None = None,
             *, pool_bos: bool = False) -> dict[str, Tensor]:
    """Rows ``[BOS] instruction caption [EOT] pad`` with exact attention and pool masks.

    Without instructions the ids equal ``tokenizer(texts)`` (the core tokenizer), so embeddings computed here
    and those of the evaluation (which tokenizes captions with the core tokenizer) agree.
    """
    instructions = instructions or [""] * len(texts)
    if len(instructions) != len(texts):
        raise ValueError(f"{len(instructions)} instructions for {len(texts)} texts")
    return assemble_rows(tokenizer, [tokenizer.encode(t) for t in texts],
                         [tokenizer.encode(i) if i else [] for i in instructions], pool_bos=pool_bos)


def assemble_rows(tokenizer: Any, caption_ids: list[list[int]], instruction_ids: list[list[int]],
                  *, pool_bos: bool = False) -> dict[str, Tensor]:
    """:func:`tokenize` from token ids: each caption is cut to the room its instruction leaves."""
    L = tokenizer.context_length
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    B = len(caption_ids)
    ids = torch.full((B, L), tokenizer.pad_id, dtype=torch.long)
    attention = torch.zeros(B, L, dtype=torch.bool)
    pool = torch.zeros(B, L, dtype=torch.bool)
    for i, (instr_ids, caption) in enumerate(zip(instruction_ids, caption_ids)):
        room = L - len(head) - len(instr_ids) - 1
        if room < 1:
            raise ValueError(f"an instruction of {len(instr_ids)} tokens leaves no room for the caption in "
                             f"context length {L}")
        text_ids = list(caption)[:room] + [tokenizer.eot_id]
        row = head + list(instr_ids) + text_ids
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = True
        pool[i, len(row) - len(text_ids): len(row)] = True
        if pool_bos and head:
            pool[i, 0] = True
    return {"tokens": ids, "attention": attention, "pool": pool}


def instruct_rows(tokens_BL: Tensor, tokenizer: Any, instruction: str, *, pool_bos: bool = False) -> dict[str, Tensor]:
    """Core-tokenizer rows ``[BOS] caption [EOT] pad`` -> the rows :func:`tokenize` makes with ``instruction``."""
    attention_BL, _ = masks_from_tokens(tokens_BL, bos_id=tokenizer.bos_id, eot_id=tokenizer.eot_id,
                                        pool_bos=True)
    start = 1 if tokenizer.bos_id is not None else 0
    captions = [row[start: int(n) - 1].tolist() for row, n in zip(tokens_BL.cpu(), attention_BL.sum(dim=1))]
    instr_ids = tokenizer.encode(instruction)
    out = assemble_rows(tokenizer, captions, [instr_ids] * len(captions), pool_bos=pool_bos)
    return {k: v.to(tokens_BL.device) for k, v in out.items()}


def hidden_states(model: nn.Module, tokens_BL: Tensor, attention_BL: Tensor, *, bidirectional: bool) -> Tensor:
    """``model``'s last hidden states with position ids over real tokens; a padding-only 4-D mask if
    ``bidirectional`` (its attention modules must have ``is_causal = False``; boolean under SDPA, additive
    under eager attention), else the 2-D mask."""
    attention_BL = attention_BL.to(torch.bool)
    position_BL = (attention_BL.long().cumsum(dim=1) - 1).clamp(min=0)
    if bidirectional and getattr(getattr(model, "config", None), "_attn_implementation", "") == "sdpa":
        # Boolean (True = attend): no dtype to match, so it holds whatever dtype the weights are computed in
        # (autocast, FSDP2's mixed precision).
        mask: Tensor = attention_BL[:, None, None, :].expand(-1, 1, attention_BL.shape[1], -1)
    elif bidirectional:
        mask = padding_only_mask(attention_BL, next(model.parameters()).dtype)
    else:
        mask = attention_BL.long()
    return model(input_ids=tokens_BL, attention_mask=mask, position_ids=position_BL).last_hidden_state


class LlmEncoder(nn.Module):
    """A transformers base model (``AutoModel``) as a caption embedder: ``forward -> [B, D]`` float32.

    Args:
        model: The base model (``LlamaModel``, ``BertModel``, ...; a peft wrapper around one is fine).
        bidirectional: Remove the causal mask of a decoder (no effect on encoders).
        settings: Pooling settings (stored with a saved model).
    """

    def __init__(self, model: nn.Module, *, bidirectional: bool = True, settings: EncoderSettings | None = None):
        super().__init__()
        self.model = model
        self.settings = settings or EncoderSettings(bidirectional=bidirectional)
        self.settings.bidirectional = bidirectional
        causal = [m for m in model.modules() if getattr(m, "is_causal", False)]
        # A decoder: its attention modules declare themselves causal. Encoders (BERT) have none.
        self.is_decoder = bool(causal)
        if self.settings.pooling != "mean":
            raise ValueError(f"pooling {self.settings.pooling!r} is not supported (only 'mean')")
        if bidirectional:
            for m in causal:
                m.is_causal = False
        config = getattr(model, "config", None)
        self.width: int = int(config.hidden_size)

    @property
    def blocks(self) -> nn.ModuleList:
        """The model's transformer layers (the core's FSDP2 shards each one)."""
        return decoder_layers(self.model)

    def hidden_states(self, tokens_BL: Tensor, attention_BL: Tensor) -> Tensor:
        """Last hidden states [B, L, D] (model dtype) under the bidirectional (or the model's own) mask."""
        return hidden_states(self.model, tokens_BL, attention_BL,
                             bidirectional=self.is_decoder and self.settings.bidirectional)

    def forward(self, tokens_BL: Tensor, attention_BL: Tensor, pool_BL: Tensor | None = None) -> Tensor:
        """Mean of the last hidden states over ``pool_BL`` (default: the attention mask), in float32."""
        attention_BL = attention_BL.to(torch.bool)
        pool_BL = attention_BL if pool_BL is None else pool_BL.to(torch.bool)
        hidden_BLD = self.hidden_states(tokens_BL, attention_BL).float()
        w_BL1 = pool_BL.unsqueeze(-1).float()
        return (hidden_BLD * w_BL1).sum(dim=1) / w_BL1.sum(dim=1).clamp(min=1.0)

    def forward_tokens(self, tokens_BL: Tensor, tokenizer: Any, *, instruction: str = "") -> Tensor:
        """Embed right-padded core-tokenizer rows (the evaluation's and the extraction's path), with
        ``instruction`` put between BOS and each caption (attended to, not pooled) when given."""
        if instruction:
            rows = instruct_rows(tokens_BL, tokenizer, instruction, pool_bos=self.settings.pool_bos)
            tokens_BL, attention_BL, pool_BL = rows["tokens"], rows["attention"], rows["pool"]
        else:
            attention_BL, pool_BL = masks_from_tokens(tokens_BL, bos_id=tokenizer.bos_id, eot_id=tokenizer.eot_id,
                                                      pool_bos=self.settings.pool_bos)
        # Drop the all-padding tail columns (a host read; this path is for extraction and evaluation only).
        length = max(int(attention_BL.sum(dim=1).max()), 1)
        return self(tokens_BL[:, :length], attention_BL[:, :length], pool_BL[:, :length])


def load_encoder(path: str | Path, *, bidirectional: bool | None = None, from_config: bool = False,
                 dtype: torch.dtype = torch.float32) -> LlmEncoder:
    """Load a text model folder (transformers layout, optional ``llm2clip.json``) as an :class:`LlmEncoder`,
    its weights in ``dtype`` (explicit: transformers 5 would otherwise keep the checkpoint's dtype, 4.x float32)."""
    from transformers import AutoConfig, AutoModel

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"text model folder {path} has no config.json (expected a transformers model folder)")
    settings = EncoderSettings.read(folder)
    if bidirectional is None:
        bidirectional = settings.bidirectional
    # Eager or SDPA attention both honour the 4-D mask; flash attention would ignore it, so it is not offered.
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", **dtype_kwargs(dtype)}
    if from_config:
        model = AutoModel.from_config(AutoConfig.from_pretrained(folder), **kwargs)
    else:
        model = AutoModel.from_pretrained(folder, **kwargs)
    return LlmEncoder(model, bidirectional=bidirectional, settings=settings)


def save_encoder(encoder: LlmEncoder, folder: str | Path, tokenizer_source: str | Path | None = None) -> Path:
    """Save the (merged) base model, its ``llm2clip.json`` and the tokenizer files beside it."""
    import shutil

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model = encoder.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    for m in model.modules():  # save a plain model: causality is re-applied from the settings on load
        if hasattr(m, "is_causal") and encoder.is_decoder:
            m.is_causal = True
    model.save_pretrained(out)
    if encoder.settings.bidirectional:
        for m in model.modules():
            if hasattr(m, "is_causal") and encoder.is_decoder:
                m.is_causal = False
    (out / SETTINGS_FILE).write_text(json.dumps(asdict(encoder.settings), indent=1) + "\n")
    if tokenizer_source is not None:
        src = Path(tokenizer_source)
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                 "tokenizer.model", "merges.txt", "vocab.json")
        for name in names:
            if (src / name).is_file() and src.resolve() != out.resolve():
                shutil.copyfile(src / name, out / name)
        if src.is_file():
            shutil.copyfile(src, out / "tokenizer.json")
    return out
