#!/usr/bin/env python
"""Per-GPU memory estimate of LLM2CLIP stage 1 (``llama3_8b_cc``) under FSDP2 full sharding, on the meta device.

    python tools/llm2clip_memory.py                        # Llama-3-8B, 8 x 80 GB, the preset's batch and context
    python tools/llm2clip_memory.py --gpus 16 --batch 2048 --text-model /models/Llama-3.1-8B-Instruct

Nothing is downloaded and no weights are allocated: the package's own stage-1 model (``CaptionEmbedder``:
the bidirectional text model in bf16 with LoRA on all attention and MLP linears, fp32 LoRA weights) is built
on the meta device from Llama-3-8B's published configuration (or ``--text-model``'s ``config.json``), and
every figure below is counted from it:

- sharded state: the frozen bf16 base weights, the fp32 LoRA weights, their fp32 gradients and AdamW's two
  fp32 moments, each divided over the GPUs (FSDP2 ``fully_shard``, one mesh of all ranks);
- all-gathered weights: the root group (embeddings, final norm: not resharded after the forward) and two
  decoder layers at a time (the one computing and the one prefetched), in bf16 (``MixedPrecisionPolicy``);
- activations with gradient checkpointing (per decoder layer, non-reentrant): what the forward keeps for the
  backward, counted by running the model's forward on the meta device under ``saved_tensors_hooks`` (each
  layer's bf16 input, then the final norm and the pooling), and the recompute of one layer during
  the backward (its forward's saved tensors, counted the same way with the LoRA dropout on, in bf16, with
  SDPA replaced by a stand-in that saves what PyTorch's memory-efficient kernel saves: q, k, v, the output,
  the log-sum-exp and the additive mask);
- backward transients: an estimate, three gradients of the MLP's widest activation per row.

Rows per sample: query, positive and hard negative (3), at the full context (rows are cut to the batch's
longest, so this is the worst case). Not counted: the CUDA context and NCCL buffers (about 1-2 GiB), the
allocator's fragmentation, the data loader's pinned memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

# meta-llama/Meta-Llama-3-8B-Instruct's config.json (the fields that size the model).
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "bos_token_id": 128000, "eos_token_id": 128009,
             "tie_word_embeddings": False, "hidden_act": "silu"}
GIB = 2**30


class _EfficientAttention(torch.autograd.Function):
    """What SDPA's memory-efficient kernel keeps for the backward: q, k, v, output, log-sum-exp, the mask."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: meta tensors
        raise NotImplementedError


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device) if attn_mask is not None else q.new_empty(0)
    return _EfficientAttention.apply(q, k, v, bias)


class _Saved:
    """``saved_tensors_hooks`` that add up the distinct activation tensors saved (parameters excluded)."""

    def __init__(self, params: set[int]) -> None:
        self.params, self.seen, self.keep, self.bytes = params, set(), [], 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(t) not in self.params and id(base) not in self.params and id(base) not in self.seen:
            self.seen.add(id(base))
            self.keep.append(base)  # keeps ids unique while counting
            self.bytes += base.untyped_storage().nbytes()
        return t

    def start(self) -> None:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()

    def stop(self) -> None:
        self._ctx.__exit__(None, None, None)

    def __enter__(self) -> _Saved:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def build(text_model: str | None):
    """The stage-1 model of ``llama3_8b_cc`` on the meta device (bf16 base, fp32 LoRA) and its config."""
    from vlp_llm2clip import LLM_METHOD
    from vlp_llm2clip.caption_model import CaptionEmbedder

    cfg = LLM_METHOD.preset("llama3_8b_cc")
    folder = Path(text_model) if text_model else Path(tempfile.mkdtemp(prefix="llm2clip-memory-"))
    if not text_model:
        (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    cfg.loss.text_model = str(folder)
    with torch.device("meta"):
        model = CaptionEmbedder(cfg.loss, from_config=True, dtype=torch.bfloat16)
    return model, cfg


def _rows(model, rows: int, context: int) -> dict[str, torch.Tensor]:
    tokens = torch.zeros(rows, context, dtype=torch.long, device="meta")
    mask = torch.ones(rows, context, dtype=torch.bool, device="meta")
    return {"q_tokens": tokens, "q_attention": mask, "q_pool": mask}


def activation_bytes(model, context: int) -> dict[str, float]:
    """Per row of ``context`` tokens: checkpointed layer inputs, what is saved outside them, one layer's recompute."""
    import transformers.integrations.sdpa_attention as sdpa_module

    encoder = model.encoder
    model.to(torch.bfloat16)  # FSDP2's param_dtype: the LoRA weights compute in bf16 too
    model.train()
    params = {id(p) for p in model.parameters()}
    layers = encoder.blocks
    width = encoder.width
    original = sdpa_module.torch.nn.functional.scaled_dot_product_attention
    sdpa_module.torch.nn.functional.scaled_dot_product_attention = _sdpa
    try:
        model.set_grad_checkpointing(True)
        with _Saved(params) as outside:  # the checkpointed layers' insides are not saved in the forward
            model(_rows(model, 1, context))["q"].sum()
        model.set_grad_checkpointing(False)
        recompute = _Saved(params)
        hook = layers[0].register_forward_pre_hook(lambda *_: recompute.start())
        done = layers[0].register_forward_hook(lambda *_: recompute.stop())
        model(_rows(model, 1, context))
        hook.remove()
        done.remove()
    finally:
        sdpa_module.torch.nn.functional.scaled_dot_product_attention = original
    intermediate = int(encoder.model.config.intermediate_size)
    checkpoints = len(layers) * context * width * 2  # each layer's bf16 input, within ``outside``
    return {"checkpoints": checkpoints, "outside": outside.bytes - checkpoints,
            "recompute": recompute.bytes, "transients": 3 * context * intermediate * 2}


def estimate(model, *, gpus: int, batch: int, context: int, rows_per_sample: int) -> list[tuple[str, float, float]]:
    """Rows ``(what, per-sample bytes or 0, bytes per GPU)``."""
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = model.encoder.blocks
    layer_bf16 = sum(p.numel() for p in layers[0].parameters()) * 2
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root_bf16 = sum(p.numel() for p in model.parameters() if id(p) not in in_layers) * 2
    act = activation_bytes(model, context)
    per_gpu = batch // gpus
    per_sample = {k: v * rows_per_sample for k, v in act.items()}
    return [
        ("text-model weights, bf16, sharded", 0, frozen / gpus),
        ("LoRA weights, fp32, sharded", 0, lora * 4 / gpus),
        ("LoRA gradients, fp32, sharded", 0, lora * 4 / gpus),
        ("AdamW moments (2 x fp32), sharded", 0, 2 * lora * 4 / gpus),
        ("all-gathered root: embeddings + norm, bf16", 0, root_bf16),
        ("all-gathered layers: 2 x one layer, bf16", 0, 2 * layer_bf16),
        ("activations: checkpointed layer inputs", per_sample["checkpoints"], per_gpu * per_sample["checkpoints"]),
        ("activations: final norm, pooling", per_sample["outside"], per_gpu * per_sample["outside"]),
        ("activations: one layer's recompute", per_sample["recompute"], per_gpu * per_sample["recompute"]),
        ("backward transients (estimate)", per_sample["transients"], per_gpu * per_sample["transients"]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (GiB) for the headroom line")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: the preset's)")
    p.add_argument("--context", type=int, default=0, help="tokens per row (default: the preset's)")
    p.add_argument("--rows-per-sample", type=int, default=3, help="3: query, positive, hard negative")
    p.add_argument("--text-model", help="a folder whose config.json sizes the model (default: Llama-3-8B's)")
    args = p.parse_args(argv)
    model, cfg = build(args.text_model)
    batch = args.batch or cfg.train.batch_size
    context = args.context or cfg.model.text.context_length
    if batch % args.gpus:
        raise SystemExit(f"llm2clip_memory: --batch {batch} is not divisible by --gpus {args.gpus}")
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = estimate(model, gpus=args.gpus, batch=batch, context=context, rows_per_sample=args.rows_per_sample)
    print(f"LLM2CLIP stage 1 (llama3_8b_cc): {n_frozen / 1e9:.2f}B frozen bf16 + {n_lora / 1e6:.1f}M LoRA fp32 "
          f"parameters; FSDP2 full sharding over {args.gpus} GPUs; global batch {batch} "
          f"({batch // args.gpus} per GPU, {args.rows_per_sample} rows of {context} tokens each); "
          f"gradient checkpointing per layer")
    print(f"{'':46s} {'per sample':>12s} {'per GPU':>10s}")
    for what, sample, gpu in rows:
        sample_txt = f"{sample / 2**20:8.1f} MiB" if sample else ""
        print(f"{what:46s} {sample_txt:>12s} {gpu / GIB:6.2f} GiB")
    total = sum(r[2] for r in rows)
    print(f"{'total (peak, estimate)':46s} {'':>12s} {total / GIB:6.2f} GiB")
    print(f"{'headroom on ' + format(args.gpu_gib, 'g') + ' GiB':46s} {'':>12s} {args.gpu_gib - total / GIB:6.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
