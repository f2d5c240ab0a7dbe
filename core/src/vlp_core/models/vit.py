"""Vision tower: a timm ``VisionTransformer`` (or ``Eva``) whose output is split into pooled, prefix and patch
tokens.

The explicit build (no ``timm_name``) expresses, by config, the OpenAI/OpenCLIP ViT (``pre_norm`` = ln_pre,
``act='quick_gelu'``, LayerNorm eps 1e-5, class token, ``norm`` = ln_post on every token) and the SigLIP ViT
(no class token, ``act='gelu_tanh'``, eps 1e-6, ``pool='map'``: timm's ``AttentionPoolLatent`` is SigLIP's
MAP head). With ``timm_name`` any timm ``VisionTransformer`` or ``Eva`` (EVA02, for LLM2CLIP) is wrapped.

Shape legend:
    B: batch, C: image channels, H/W: image height/width (in ``images_BCHW``),
    T: all tokens (P + N), P: prefix tokens (class token, then extra tokens), N: patch tokens, D: width.

Extra (prefix) tokens and their positions. timm implements ``extra_tokens`` as register tokens
(``reg_token``, shape [1, R, D], one free vector per token) placed after the class token. Their position
embedding depends on ``no_embed_class``:

- ``no_embed_class=False`` (timm's default, used by the explicit build and e.g. ``vit_tiny_patch16_224``):
  ``pos_embed`` has ``num_prefix_tokens + num_patches`` rows, so the class token and each extra token get
  their own learned position row.
- ``no_embed_class=True`` (DeiT-3, DINOv2-reg, ...): ``pos_embed`` covers patches only and prefix tokens get
  no position. This loses nothing: each extra token is already an independent learned vector, so
  "token + its own learned position" is a re-parametrisation of the same free parameter (a sum of two free
  per-token vectors spans exactly what one does). Either way every extra token is distinguishable and
  learnable, which is what Llip's K mixture tokens need.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import timm
from timm.layers import PatchEmbed
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from vlp_core.config import VisionConfig
from vlp_core.models.pretrained import apply_state_dict, read_state_dict, select_prefix

__all__ = ["VisionOutput", "VisionTower", "build_vision_tower"]

# Our pool names -> timm's ``global_pool``. We pool ourselves; passing the choice to timm keeps it from
# building heads we would never call (an unused attention-pool head breaks DDP without
# find_unused_parameters).
_POOL_TO_TIMM = {"token": "token", "avg": "avg", "none": "", "map": "map"}
_TRUNKS = (VisionTransformer, Eva)
_TIMM_PRETRAINED = "timm"  # ``vision.pretrained`` value meaning "timm's own pretrained weights"


class VisionOutput(NamedTuple):
    """Outputs of :class:`VisionTower` (all after the final norm).

    Attributes:
        pooled: [B, D] image feature. ``pool='token'``: the class token. ``pool='avg'``: the mean of the
            patch tokens (prefix tokens excluded). ``pool='map'``: the attention-pool head over all tokens.
            ``pool='none'``: the first prefix token (the class token
            when there is one, else the first extra token), or the patch mean when there is no prefix.
        prefix: [B, P, D] prefix tokens: the class token (if any), then the ``extra_tokens`` learnable
            tokens. P may be 0.
        patches: [B, N, D] patch tokens in raster order (row-major over ``grid_size``).
    """

    pooled: Tensor
    prefix: Tensor
    patches: Tensor


class VisionTower(nn.Module):
    """Wraps a timm ``VisionTransformer`` or ``Eva`` (as ``self.trunk``).

    Args:
        trunk: The timm model, built with ``num_classes=0`` (and, for a ViT, ``fc_norm=False``) so that its
            ``forward_features`` ends with the final norm applied to every token.
        pool: ``"token"``, ``"avg"``, ``"none"`` or ``"map"`` (see :class:`VisionOutput`).
    """

    def __init__(self, trunk: VisionTransformer | Eva, *, pool: str = "token") -> None:
        super().__init__()
        if not isinstance(trunk, _TRUNKS):
            raise ValueError(f"the vision trunk must be a timm VisionTransformer or Eva, got {type(trunk).__name__}")
        if pool not in _POOL_TO_TIMM:
            raise ValueError(f"vision pool must be one of {list(_POOL_TO_TIMM)}, got {pool!r}")
        has_class_token = getattr(trunk, "cls_token", None) is not None
        if pool == "token" and not has_class_token:
            raise ValueError("vision.pool='token' needs a class token; use pool='avg' or enable class_token")
        if pool == "map" and getattr(trunk, "attn_pool", None) is None:
            raise ValueError("vision.pool='map' needs the trunk's attention-pool head (timm global_pool='map')")
        if not isinstance(trunk.fc_norm, nn.Identity):
            # timm normalises after pooling when fc_norm is on; move it to the per-token position so that
            # prefix and patch tokens are normalised too (same weights, applied before pooling).
            trunk.norm, trunk.fc_norm = trunk.fc_norm, nn.Identity()
        # timm turns fused attention off under TIMM_FUSED_ATTN=0 or old torch; we always want SDPA.
        for m in trunk.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
        self.trunk = trunk
        self.pool = pool
        self.width: int = int(trunk.embed_dim)
        self.num_prefix_tokens: int = int(trunk.num_prefix_tokens)
        self.num_patches: int = int(trunk.patch_embed.num_patches)
        self.grid_size: tuple[int, int] = tuple(int(g) for g in trunk.patch_embed.grid_size)  # type: ignore[assignment]
        img_hw = tuple(int(s) for s in trunk.patch_embed.img_size)
        self._img_hw: tuple[int, ...] = img_hw
        self.image_size: int = img_hw[0]

    def forward(self, images_BCHW: Tensor) -> VisionOutput:
        """Encode images.

        Args:
            images_BCHW: [B, C, H, W] normalised images of the tower's ``image_size``.

        Returns:
            :class:`VisionOutput` with pooled [B, D], prefix [B, P, D] and patches [B, N, D].
        """
        if images_BCHW.ndim != 4 or tuple(images_BCHW.shape[-2:]) != self._img_hw:
            raise ValueError(
                f"vision tower expects images [B, C, {self._img_hw[0]}, {self._img_hw[1]}], "
                f"got {list(images_BCHW.shape)}"
            )
        tokens_BTD = self.trunk.forward_features(images_BCHW)
        P = self.num_prefix_tokens
        prefix_BPD = tokens_BTD[:, :P]
        patches_BND = tokens_BTD[:, P:]
        if self.pool == "map":
            pooled_BD = self.trunk.attn_pool(tokens_BTD)
        elif self.pool == "avg" or (self.pool == "none" and P == 0):
            pooled_BD = patches_BND.mean(dim=1)
        else:  # "token" (class token is at position 0) or "none" with a prefix
            pooled_BD = prefix_BPD[:, 0]
        return VisionOutput(pooled=pooled_BD, prefix=prefix_BPD, patches=patches_BND)

    @property
    def blocks(self) -> nn.Module:
        """The transformer blocks, in order: the unit that sharding and activation checkpointing wrap."""
        return self.trunk.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (timm's non-reentrant checkpointing)."""
        self.trunk.set_grad_checkpointing(enable)


def _load_local(tower: VisionTower, source: str) -> None:
    """Load a local/hub checkpoint into the trunk, accepting timm-layout or whole-tower (``trunk.``) keys."""
    state_dict = read_state_dict(source)
    if any(k.startswith("trunk.") for k in state_dict):
        state_dict = select_prefix(state_dict, "trunk.")
    # timm's filter converts foreign layouts (OpenCLIP ``visual.trunk.``, big_vision, ...) and resamples
    # ``pos_embed`` / the patch kernel when the checkpoint was trained at another resolution.
    if isinstance(tower.trunk, Eva):
        from timm.models.eva import checkpoint_filter_fn as eva_filter

        state_dict = eva_filter(state_dict, tower.trunk)
    else:
        state_dict = checkpoint_filter_fn(state_dict, tower.trunk)
    apply_state_dict(tower.trunk, state_dict, strict=True, source=source)


def _create_named(cfg: VisionConfig, common: dict[str, Any], timm_pretrained: bool) -> VisionTransformer | Eva:
    """``timm.create_model(cfg.timm_name, ...)`` for a ViT or Eva, with ``cfg.timm_kwargs`` on top."""
    if timm_pretrained and cfg.extra_tokens:
        # New register tokens change pos_embed's prefix rows; timm's loader cannot map old weights.
        raise ValueError("vision.extra_tokens > 0 cannot be combined with vision.pretrained='timm'")
    if not timm.is_model(cfg.timm_name):
        raise ValueError(f"vision.timm_name {cfg.timm_name!r} is not a timm model")
    family = timm.models.model_entrypoint(cfg.timm_name).__module__.rsplit(".", 1)[-1]
    kwargs = dict(common)
    if family == "eva":
        if cfg.extra_tokens:
            kwargs["num_reg_tokens"] = cfg.extra_tokens
        kwargs["use_fc_norm"] = False  # final norm on every token
    else:
        if cfg.extra_tokens:
            kwargs["reg_tokens"] = cfg.extra_tokens
        kwargs["fc_norm"] = False
    kwargs.update(cfg.timm_kwargs)
    try:
        trunk = timm.create_model(cfg.timm_name, pretrained=timm_pretrained, **kwargs)
    except (AssertionError, TypeError) as e:
        # timm asserts (token pooling without class token) or rejects kwargs a family does not take.
        raise ValueError(
            f"timm model {cfg.timm_name!r} cannot be built as a vision tower (vlp wraps timm VisionTransformer "
            f"and Eva models): {e}"
        ) from e
    if not isinstance(trunk, _TRUNKS):
        raise ValueError(
            f"vision.timm_name {cfg.timm_name!r} builds a {type(trunk).__name__}, "
            "not a timm VisionTransformer or Eva"
        )
    return trunk


class ConvStemPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with its strided projection replaced by 3x3 stride-2 convolutions + GELU.

    Channels double from ``embed_dim / 2**(n-1)`` (at least 16) up to ``embed_dim``; a final 1x1 convolution
    projects to ``embed_dim``. No batch norm: per-rank statistics would break the equality of distributed and
    single-process training.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        stride = self.patch_size[0]
        n = stride.bit_length() - 1
        in_chans, dim = self.proj.in_channels, self.proj.out_channels
        layers: list[nn.Module] = []
        chans = in_chans
        for i in range(n):
            out = max(32, dim // 2 ** (n - 1 - i))
            # GroupNorm normalises each sample on its own: no cross-rank statistics, unlike BatchNorm.
            layers += [nn.Conv2d(chans, out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, out), nn.GELU()]
            chans = out
        layers.append(nn.Conv2d(chans, dim, 1))
        self.proj = nn.Sequential(*layers)


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    """Build the image tower described by ``cfg``.

    ``cfg.timm_name`` non-empty: ``timm.create_model`` of that (VisionTransformer or Eva) architecture at
    ``cfg.image_size`` with ``cfg.extra_tokens`` register tokens (when > 0; otherwise the model's own
    register count is kept) and ``cfg.timm_kwargs``; the explicit size fields are ignored. Empty: a
    ``VisionTransformer`` from the explicit fields. ``cfg.pretrained``: ``"timm"`` for timm's own weights
    (named models only; downloads), else a local file/folder or hub id loaded through :mod:`vlp_core.models.pretrained`.

    Args:
        cfg: Vision configuration.

    Returns:
        The tower.

    Raises:
        ValueError: For inconsistent configurations or a timm model that is not a VisionTransformer.
    """
    cfg.validate()
    if cfg.pool not in _POOL_TO_TIMM:
        raise ValueError(f"vision.pool must be one of {list(_POOL_TO_TIMM)}, got {cfg.pool!r}")
    if cfg.extra_tokens < 0:
        raise ValueError(f"vision.extra_tokens must be >= 0, got {cfg.extra_tokens}")
    if cfg.pool == "token" and not cfg.class_token and not cfg.timm_name:
        raise ValueError("vision.pool='token' needs vision.class_token=true; use pool='avg' or 'none'")
    timm_pretrained = cfg.pretrained == _TIMM_PRETRAINED
    common: dict[str, Any] = dict(
        num_classes=0,
        img_size=cfg.image_size,
        drop_path_rate=cfg.drop_path,
        global_pool=_POOL_TO_TIMM[cfg.pool],
    )
    if cfg.timm_name:
        trunk = _create_named(cfg, common, timm_pretrained)
    else:
        if timm_pretrained:
            raise ValueError("vision.pretrained='timm' needs vision.timm_name")
        if cfg.timm_kwargs:
            raise ValueError("vision.timm_kwargs applies to vision.timm_name models only; set the size fields")
        trunk = VisionTransformer(
            patch_size=cfg.patch_size,
            embed_dim=cfg.width,
            depth=cfg.depth,
            num_heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            class_token=cfg.class_token,
            reg_tokens=cfg.extra_tokens,
            no_embed_class=False,  # every prefix token gets its own learned position row
            pre_norm=cfg.pre_norm,  # OpenAI's ln_pre; timm then drops the patch-embedding bias, as CLIP does
            act_layer=cfg.act,
            norm_layer=functools.partial(nn.LayerNorm, eps=cfg.norm_eps),
            embed_layer=ConvStemPatchEmbed if cfg.stem == "conv" else PatchEmbed,
            # Final norm on every token (not after pooling), so prefix/patch tokens are normalised too.
            fc_norm=False,
            **common,
        )
    tower = VisionTower(trunk, pool=cfg.pool)
    if cfg.pretrained and not timm_pretrained:
        _load_local(tower, cfg.pretrained)
    return tower
