"""Which keys a decoding query reads: sparse and selected attention.

Selection methods return, per head, the indices of the cached keys a query reads;
:func:`sparse_attention` is the one op that consumes them.
"""

from qkv.reference.sparse.a2ats_retrieval import A2ATS, a2ats
from qkv.reference.sparse.actqkv_probe import ActQKV, actqkv
from qkv.reference.sparse.hip_tree import HiP, hip
from qkv.reference.sparse.prflash_mask import prflash
from qkv.reference.sparse.selected_keys import merge_partials, sparse_attention
from qkv.reference.sparse.tidal_selector import TidalDecode, tidaldecode
from qkv.reference.sparse.tokenselect_selector import TokenSelect, tokenselect

__all__ = [
    "A2ATS",
    "ActQKV",
    "HiP",
    "TidalDecode",
    "TokenSelect",
    "a2ats",
    "actqkv",
    "hip",
    "merge_partials",
    "prflash",
    "sparse_attention",
    "tidaldecode",
    "tokenselect",
]
