"""Text towers: a CLIP-style causal transformer, and a wrapper around any ``transformers`` AutoModel.

Shape legend:
    B: batch, L: sequence length (<= context length), D: width, V: vocabulary size.

Token layout: real tokens first (``[BOS] ids... [EOT]``), then padding up to the context length (right
padding). The real tokens end at the **first end-of-text token** (after position 0 when BOS and EOT share an
id, GPT-2 style). Masks come from that position, never from the pad id: OpenAI's CLIP pads with id 0, a real
token, and Hugging Face's CLIP tokenizers pad with EOT itself. For CLIP's BPE, where EOT has the largest id,
this is OpenAI's ``argmax`` rule. ``eot`` pooling takes the EOT token, ``mean`` averages the real tokens,
``first`` takes position 0 and ``last`` the last position (SigLIP, whose text tower attends to its pads).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp_core.config import TextConfig
from vlp_core.models.layers import TransformerBlock, padding_to_attn_mask
from vlp_core.models.pretrained import load_pretrained

__all__ = [
    "TextOutput", "CausalTextTransformer", "HFTextTower", "build_text_tower", "pool_tokens", "real_token_mask",
]

_POOLS = ("eot", "mean", "first", "last")


class TextOutput(NamedTuple):
    """Outputs of a text tower.

    Attributes:
        pooled: [B, D] pooled text feature (see :func:`pool_tokens`).
        tokens: [B, L, D] per-token features after the final norm.
    """

    pooled: Tensor
    tokens: Tensor


def real_token_mask(tokens_BL: Tensor, *, eot_id: int | None, pad_id: int, bos_is_eot: bool = False) -> Tensor:
    """[B, L] True for the real tokens: every position up to and including the first EOT.

    Args:
        tokens_BL: Right-padded token ids.
        eot_id: End-of-text id. ``None`` (legacy callers): real = ``tokens != pad_id``.
        pad_id: Padding id (used only without ``eot_id``).
        bos_is_eot: Position 0 holds BOS with the same id as EOT (GPT-2 style): look for EOT after it.

    A row without EOT (cannot come from :class:`vlp_core.data.tokenizer.Tokenizer`, which always ends the
    real tokens with it) counts every position as real.
    """
    if eot_id is None:
        return tokens_BL != pad_id
    is_eot_BL = tokens_BL == eot_id
    if bos_is_eot:
        is_eot_BL[:, 0] = False
    seq_len = tokens_BL.shape[1]
    # argmax returns the first maximal index: the first EOT. No host sync.
    first_B = torch.where(is_eot_BL.any(dim=1), is_eot_BL.to(torch.uint8).argmax(dim=1), seq_len - 1)
    return torch.arange(seq_len, device=tokens_BL.device)[None, :] <= first_B[:, None]


def pool_tokens(tokens_BLD: Tensor, mask_BL: Tensor, pool: str) -> Tensor:
    """Pool per-token features.

    Args:
        tokens_BLD: [B, L, D] features.
        mask_BL: [B, L] True for real tokens (a prefix of each row: see :func:`real_token_mask`).
        pool: ``"eot"`` (last real token: the EOT), ``"mean"`` (masked mean), ``"first"`` (position 0) or
            ``"last"`` (position L - 1, whatever it holds).

    Returns:
        [B, D] pooled features.
    """
    if pool == "first":
        return tokens_BLD[:, 0]
    if pool == "last":
        return tokens_BLD[:, -1]
    mask_BL = mask_BL.to(torch.bool)
    if pool == "eot":
        # Right padding: the last real token sits at (count - 1). Clamp for an (invalid) all-pad row.
        last_B = (mask_BL.sum(dim=1) - 1).clamp(min=0)
        return tokens_BLD[torch.arange(tokens_BLD.shape[0], device=tokens_BLD.device), last_B]
    if pool == "mean":
        w_BL1 = mask_BL.unsqueeze(-1).to(tokens_BLD.dtype)
        return (tokens_BLD * w_BL1).sum(dim=1) / w_BL1.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"text pool must be one of {list(_POOLS)}, got {pool!r}")


class CausalTextTransformer(nn.Module):
    """CLIP-style text transformer: token + learned position embeddings, pre-norm blocks, final LayerNorm.

    Args:
        vocab_size: Vocabulary size V.
        context_length: Maximum sequence length (size of the position table).
        width: Model width D.
        depth: Number of blocks.
        heads: Attention heads.
        mlp_ratio: MLP hidden width as a multiple of D.
        causal: Causal self-attention (CLIP). Non-causal uses a key-padding mask instead (or none: see
            ``mask_pads``).
        pad_id: Padding token id (the real-token mask without ``eot_id`` only).
        eot_id: End-of-text id: the real tokens end at its first occurrence (see the module docstring).
        bos_is_eot: The tokenizer's BOS has the EOT id (then the search for EOT starts at position 1).
        pool: ``"eot"``, ``"mean"``, ``"first"`` or ``"last"``.
        mask_pads: Non-causal only: keep pads out of attention. ``False`` attends everywhere (SigLIP).
        act: MLP activation (``"gelu"``, ``"quick_gelu"`` for OpenAI CLIP, ``"gelu_tanh"`` for SigLIP).
        norm_eps: LayerNorm epsilon (CLIP 1e-5, SigLIP 1e-6).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        context_length: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        pad_id: int = 0,
        eot_id: int | None = None,
        bos_is_eot: bool = False,
        pool: str = "eot",
        mask_pads: bool = True,
        act: str = "gelu",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"text pool must be one of {list(_POOLS)}, got {pool!r}")
        if width % heads:
            raise ValueError(f"text width {width} is not divisible by heads {heads}")
        if min(vocab_size, context_length, width, depth, heads) <= 0:
            raise ValueError("text vocab_size, context_length, width, depth and heads must all be positive")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"text pad_id {pad_id} is outside the vocabulary [0, {vocab_size})")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width = width
        self.depth = depth
        if eot_id is not None and not 0 <= eot_id < vocab_size:
            raise ValueError(f"text eot_id {eot_id} is outside the vocabulary [0, {vocab_size})")
        self.causal = causal
        self.pad_id = pad_id
        self.eot_id = eot_id
        self.bos_is_eot = bos_is_eot
        self.pool = pool
        self.mask_pads = mask_pads
        self.grad_checkpointing = False
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(
            TransformerBlock(width, heads, mlp_ratio=mlp_ratio, act=act, norm_eps=norm_eps) for _ in range(depth)
        )
        self.ln_final = nn.LayerNorm(width, eps=norm_eps)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenCLIP's init: small embeddings, projection std scaled down with depth (residual growth)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.depth) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def embed_tokens(self, tokens_BL: Tensor) -> Tensor:
        """Token embeddings only (no positions): [B, L] ids -> [B, L, D]."""
        return self.token_embedding(tokens_BL)

    def forward_embeds(
        self, x_BLD: Tensor, *, attention_mask_BL: Tensor | None = None, final_norm: bool = True
    ) -> Tensor:
        """Add position embeddings, run the blocks and the final norm on given input embeddings.

        Args:
            x_BLD: [B, L, D] input embeddings (e.g. token embeddings with image tokens spliced in).
            attention_mask_BL: [B, L] True for real positions. Without it, a causal tower attends causally
                (flash-eligible) and a non-causal one attends everywhere. With right padding a causal tower
                does not need it: pads come after every real token and cannot reach them.
            final_norm: Apply ``ln_final``. ``False`` returns the last block's residual stream, for callers
                that put their own head on it (a language-model head with its own norm) and apply
                ``ln_final`` only where they need it.

        Returns:
            [B, L, D] features after the final norm (before it with ``final_norm=False``).
        """
        batch, seq_len, width = x_BLD.shape
        if seq_len > self.context_length:
            raise ValueError(
                f"text sequence of length {seq_len} exceeds the context length {self.context_length}"
            )
        if width != self.width:
            raise ValueError(f"text embeddings have width {width}, the tower expects {self.width}")
        x_BLD = x_BLD + self.positional_embedding[:seq_len].to(x_BLD.dtype)
        attn_mask = None
        if attention_mask_BL is not None:
            if attention_mask_BL.shape != (batch, seq_len):
                raise ValueError(
                    f"attention_mask must be [B, L] = [{batch}, {seq_len}], "
                    f"got {list(attention_mask_BL.shape)}"
                )
            attn_mask = padding_to_attn_mask(attention_mask_BL, causal=self.causal)
        is_causal = self.causal and attn_mask is None
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x_BLD = checkpoint(
                    block, x_BLD, attn_mask=attn_mask, is_causal=is_causal, use_reentrant=False
                )
            else:
                x_BLD = block(x_BLD, attn_mask=attn_mask, is_causal=is_causal)
        return self.ln_final(x_BLD) if final_norm else x_BLD

    def forward(self, tokens_BL: Tensor) -> TextOutput:
        """Encode right-padded token ids [B, L] into :class:`TextOutput`."""
        real_BL = real_token_mask(tokens_BL, eot_id=self.eot_id, pad_id=self.pad_id, bos_is_eot=self.bos_is_eot)
        # Causal: no mask at all (pads follow the real tokens and cannot affect them). Non-causal: the
        # key-padding mask keeps pads out of every real token's attention, unless the tower was trained
        # attending to its pads (SigLIP).
        mask = None if self.causal or not self.mask_pads else real_BL
        tokens_BLD = self.forward_embeds(self.embed_tokens(tokens_BL), attention_mask_BL=mask)
        return TextOutput(pooled=pool_tokens(tokens_BLD, real_BL, self.pool), tokens=tokens_BLD)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (non-reentrant checkpointing)."""
        self.grad_checkpointing = enable


def _hidden_size(config: object) -> int:
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


def _find_layers(model: nn.Module) -> nn.ModuleList:
    """The largest ModuleList of identical blocks in a transformers model (layers / h / block / layer)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        uniform = isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1
        if uniform and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return best


class HFTextTower(nn.Module):
    """Any ``transformers`` AutoModel (encoder like BERT, or decoder like GPT-2/Llama) as a text tower.

    Uses ``last_hidden_state`` (the encoder's, for encoder-decoder models) with an attention mask over the
    real tokens (up to the first EOT: see :func:`real_token_mask`; the EOT token itself is attended to even
    when the tokenizer pads with EOT). ``eot`` pooling suits decoders with right padding, ``first`` suits
    encoders with a CLS token, ``mean`` suits either.

    Args:
        name_or_path: Local folder or hub name.
        pool: ``"eot"``, ``"mean"``, ``"first"`` or ``"last"``.
        pad_id: Padding token id of the tokenizer used with this model.
        eot_id: End-of-text id of that tokenizer (None: real tokens are the non-pad ones).
        bos_is_eot: BOS has the EOT id.
        from_config: Build the architecture with random weights instead of loading them.
    """

    def __init__(
        self, name_or_path: str, *, pool: str = "mean", pad_id: int, eot_id: int | None = None,
        bos_is_eot: bool = False, from_config: bool = False,
    ) -> None:
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"text pool must be one of {list(_POOLS)}, got {pool!r}")
        from transformers import AutoConfig, AutoModel

        if from_config:
            model = AutoModel.from_config(AutoConfig.from_pretrained(name_or_path))
        else:
            model = AutoModel.from_pretrained(name_or_path)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-like: the encoder alone is the text tower
        self.model = model
        self.pool = pool
        self.pad_id = pad_id
        self.eot_id = eot_id
        self.bos_is_eot = bos_is_eot
        self.width: int = _hidden_size(model.config)
        self.vocab_size: int | None = getattr(model.config, "vocab_size", None)

    def forward(self, tokens_BL: Tensor) -> TextOutput:
        """Encode right-padded token ids [B, L] into :class:`TextOutput`."""
        mask_BL = real_token_mask(tokens_BL, eot_id=self.eot_id, pad_id=self.pad_id, bos_is_eot=self.bos_is_eot)
        out = self.model(input_ids=tokens_BL, attention_mask=mask_BL.long())
        tokens_BLD = out.last_hidden_state
        return TextOutput(pooled=pool_tokens(tokens_BLD, mask_BL, self.pool), tokens=tokens_BLD)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer layers, in order (the unit that sharding and checkpointing wrap)."""
        return _find_layers(self.model)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Toggle the model's own gradient checkpointing (non-reentrant)."""
        if enable:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()


def build_text_tower(
    cfg: TextConfig, *, vocab_size: int, pad_id: int, eot_id: int | None = None, bos_id: int | None = None
) -> CausalTextTransformer | HFTextTower:
    """Build the text tower described by ``cfg``.

    ``kind='clip'``: a :class:`CausalTextTransformer` of the configured size. ``kind='hf'``: an
    :class:`HFTextTower` with the weights of ``cfg.hf_name``. A non-empty ``cfg.pretrained`` then loads a
    checkpoint (file, folder or hub id) on top of either.

    Args:
        cfg: Text configuration.
        vocab_size: Tokenizer vocabulary size (``cfg.vocab_size``, when set, sizes the embedding instead and
            must be at least this).
        pad_id: Tokenizer padding id.
        eot_id: Tokenizer end-of-text id (where the real tokens end). None keeps the legacy pad-id mask.
        bos_id: Tokenizer BOS id (only compared with ``eot_id``).

    Returns:
        The tower (``width`` attribute, ``forward(tokens_BL) -> TextOutput``).

    Raises:
        ValueError: For inconsistent configurations.
    """
    cfg.validate()
    if cfg.vocab_size:
        if vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {vocab_size} ids but model.text.vocab_size is {cfg.vocab_size}: "
                "use the model's own tokenizer"
            )
        vocab_size = cfg.vocab_size
    bos_is_eot = bos_id is not None and bos_id == eot_id
    tower: CausalTextTransformer | HFTextTower
    if cfg.kind == "clip":
        tower = CausalTextTransformer(
            vocab_size=vocab_size,
            context_length=cfg.context_length,
            width=cfg.width,
            depth=cfg.depth,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            causal=cfg.causal,
            pad_id=pad_id,
            eot_id=eot_id,
            bos_is_eot=bos_is_eot,
            pool=cfg.pool,
            mask_pads=cfg.mask_pads,
            act=cfg.act,
            norm_eps=cfg.norm_eps,
        )
    elif cfg.kind == "hf":
        tower = HFTextTower(cfg.hf_name, pool=cfg.pool, pad_id=pad_id, eot_id=eot_id, bos_is_eot=bos_is_eot)
        if tower.vocab_size is not None and vocab_size > tower.vocab_size:
            raise ValueError(
                f"tokenizer vocabulary ({vocab_size}) is larger than {cfg.hf_name}'s ({tower.vocab_size}); "
                "use the model's own tokenizer"
            )
    else:
        raise ValueError(f"text.kind must be 'clip' or 'hf', got {cfg.kind!r}")
    if cfg.pretrained:
        load_pretrained(tower, cfg.pretrained)
    return tower
