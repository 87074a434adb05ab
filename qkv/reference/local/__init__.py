"""Local and routed attention over sequences, images and volumes (the catalog family ``local``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.local.biformer import bilevel_routing
from qkv.reference.local.davit import channel_attention, window_attention
from qkv.reference.local.hilo_attention import hilo
from qkv.reference.local.neighborhood_attention import neighbor_indices, neighbor_mask, neighborhood

__all__ = [
    "bilevel_routing",
    "channel_attention",
    "hilo",
    "neighbor_indices",
    "neighbor_mask",
    "neighborhood",
    "window_attention",
]
