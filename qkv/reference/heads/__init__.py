"""How heads share and shape keys and values (the catalog family ``heads``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.heads.grouped_query import (
    AttentionWeights,
    DGQAState,
    dgqa,
    gqa,
    kdgqa,
    pgqa,
    uptrain,
)
from qkv.reference.heads.relative_conv import mdha, rcmha, relative_attention, rmha
from qkv.reference.heads.sigma_diffqkv import HeadConfig, diffqkv, diffqkv_cost

__all__ = [
    "AttentionWeights",
    "DGQAState",
    "HeadConfig",
    "dgqa",
    "diffqkv",
    "diffqkv_cost",
    "gqa",
    "kdgqa",
    "mdha",
    "pgqa",
    "rcmha",
    "relative_attention",
    "rmha",
    "uptrain",
]
