"""Building blocks shared by the towers and by methods (flat re-exports)."""

from vlp_core.models.layers.attention import Attention, CrossAttention, padding_to_attn_mask
from vlp_core.models.layers.block import TransformerBlock
from vlp_core.models.layers.mlp import Mlp, QuickGELU, make_act

__all__ = ["Attention", "CrossAttention", "Mlp", "QuickGELU", "TransformerBlock", "make_act", "padding_to_attn_mask"]
