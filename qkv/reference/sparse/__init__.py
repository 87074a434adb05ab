"""Which keys a decoding query reads: sparse and selected attention.

Selection methods return, per head, the indices of the cached keys a query reads;
:func:`sparse_attention` is the one op that consumes them.
"""

from qkv.reference.sparse.hip_tree import HiP, hip
from qkv.reference.sparse.selected_keys import merge_partials, sparse_attention
from qkv.reference.sparse.tidal_selector import TidalDecode, tidaldecode
from qkv.reference.sparse.tokenselect_selector import TokenSelect, tokenselect

__all__ = [
    "HiP",
    "TidalDecode",
    "TokenSelect",
    "hip",
    "merge_partials",
    "sparse_attention",
    "tidaldecode",
    "tokenselect",
]
