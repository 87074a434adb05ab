"""Attention in recommender systems and prompt pools (the catalog family ``recsys``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.recsys.autoint_layer import autoint
from qkv.reference.recsys.coda_prompting import coda_prompt
from qkv.reference.recsys.dare_attention import dare
from qkv.reference.recsys.mqsa_ted import mqsa
from qkv.reference.recsys.sdim_hashing import sdim

__all__ = ["autoint", "coda_prompt", "dare", "mqsa", "sdim"]
