"""Search and ranking with queries and keys: attention-aware indexes, projections, re-rankers.

Each module follows one paper; the searches count the distance computations they make, so
that recall can be read against cost.
"""

from qkv.reference.retrieval.attention_index import (
    AttentionIndex,
    build_index,
    build_knn_index,
    graph_search,
    retrieval_attention,
)
from qkv.reference.retrieval.attention_rerank import icr
from qkv.reference.retrieval.cur_rerank import CURIndex, anncur, cur_index
from qkv.reference.retrieval.leanvec_projection import LeanVec, leanvec
from qkv.reference.retrieval.relevance_filter import (
    CosineAdapter,
    cosine_adapter,
    filter_relevant,
    fit_cosine_adapter,
)

__all__: list[str] = [
    "AttentionIndex",
    "CURIndex",
    "CosineAdapter",
    "LeanVec",
    "anncur",
    "build_index",
    "build_knn_index",
    "cosine_adapter",
    "cur_index",
    "filter_relevant",
    "fit_cosine_adapter",
    "graph_search",
    "icr",
    "leanvec",
    "retrieval_attention",
]
