"""Which keys a decoding query reads: sparse and selected attention.

Selection methods return, per head, the indices of the cached keys a query reads;
:func:`sparse_attention` is the one op that consumes them.
"""

from qkv.reference.sparse.selected_keys import merge_partials, sparse_attention

__all__ = ["merge_partials", "sparse_attention"]
