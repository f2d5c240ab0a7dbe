"""Towers: the timm vision transformer, the text transformers, and pretrained-weight loading."""

from vlp_core.models.pretrained import load_pretrained
from vlp_core.models.text import CausalTextTransformer, HFTextTower, TextOutput, build_text_tower
from vlp_core.models.vit import VisionOutput, VisionTower, build_vision_tower

__all__ = [
    "VisionOutput",
    "VisionTower",
    "build_vision_tower",
    "TextOutput",
    "CausalTextTransformer",
    "HFTextTower",
    "build_text_tower",
    "load_pretrained",
]
