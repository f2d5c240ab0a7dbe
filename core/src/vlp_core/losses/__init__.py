"""Contrastive losses (InfoNCE / sigmoid), exact under data parallelism, and the bounds of their temperatures."""

from vlp_core.losses.bounds import bounded_scalars, clamp_bounds_, declare_bounds, log_scale_bounds
from vlp_core.losses.contrastive import ClipLoss, SigLipLoss, clip_loss, normalize_features, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "normalize_features", "siglip_loss", "bounded_scalars",
           "clamp_bounds_", "declare_bounds", "log_scale_bounds"]
