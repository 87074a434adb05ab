"""Where tokens are: positional encodings and position-only attention (the catalog family ``positions``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.positions.oat_encoding import object_pe
from qkv.reference.positions.positional import (
    PositionalAttentionWeights,
    positional_attention,
)
from qkv.reference.positions.rope_alibi import rope_alibi_harmonic

__all__ = [
    "PositionalAttentionWeights",
    "object_pe",
    "positional_attention",
    "rope_alibi_harmonic",
]
