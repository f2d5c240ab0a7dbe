"""Contrastive losses (InfoNCE / sigmoid), exact under data parallelism."""

from vlp_core.losses.contrastive import ClipLoss, SigLipLoss, clip_loss, normalize_features, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "clip_loss", "normalize_features", "siglip_loss"]
