"""qkv: queries, keys and values from recent attention research.

Every op below runs on the backend chosen by ``QKV_BACKEND``, ``qkv.use_backend(...)`` or a
per-call ``backend=`` keyword, and returns the array type it was given. The readable NumPy
definitions live in :mod:`qkv.reference`.

Three kinds of names are exported:

* **dispatched ops** (``qkv.sdpa``, ``qkv.neighborhood``, ...): each backend may implement them;
  a backend that lacks one falls back to the reference with a :class:`FallbackWarning`;
* **mechanisms built from dispatched ops** (``qkv.gqa``, ``qkv.hilo``, ...): NumPy glue around
  ``qkv.sdpa`` calls, which run on the chosen backend;
* **generators** (``qkv.alibi``, ``qkv.object_pe``, ``qkv.neighbor_mask``): arrays made from
  sizes and hyperparameters, not dispatched.
"""

from __future__ import annotations

from qkv import _checks
from qkv._dispatch import current_backend, known_backends, op, use_backend
from qkv.errors import (
    BackendUnavailable,
    DTypeError,
    FallbackWarning,
    MissingOp,
    ParameterError,
    ShapeError,
    UnknownBackend,
)
from qkv.reference import core as _core
from qkv.reference import forms as _forms
from qkv.reference.forms import agent_attention as _agent_attention
from qkv.reference.forms import gaussian_attention as _gaussian
from qkv.reference.forms import selective_attention as _selective_attention
from qkv.reference.heads import grouped_query as _grouped_query
from qkv.reference.heads import relative_conv as _relative_conv
from qkv.reference.heads import sigma_diffqkv as _sigma_diffqkv
from qkv.reference.kv import mixed_precision as _kv_mixed
from qkv.reference.kv import quantization as _kv_quantize
from qkv.reference.kv import window_scoring as _kv_window
from qkv.reference.local import biformer as _biformer
from qkv.reference.local import davit as _davit
from qkv.reference.local import hilo_attention as _hilo_attention
from qkv.reference.local import neighborhood_attention as _neighborhood_attention
from qkv.reference.positions import oat_encoding as _oat_encoding
from qkv.reference.positions import positional as _positional
from qkv.reference.positions import rope_alibi as _rope_alibi
from qkv.reference.recsys import sdim_hashing as _sdim_hashing
from qkv.reference.retrieval import attention_index as _attention_index
from qkv.reference.retrieval import leanvec_projection as _leanvec
from qkv.reference.sparse import selected_keys as _sparse

__version__ = "0.1.0"

# core: softmax attention and positions
sdpa = op(_core.sdpa, check=_checks.attention_call)
flash = op(_core.flash, check=_checks.attention_call)
rope = op(_core.rope, check=_checks.rope_call)
alibi = _core.alibi  # a bias generator (no array input), not dispatched
alibi_slopes = _core.alibi_slopes

# forms: other score functions
sigmoid = op(_forms.sigmoid, check=_checks.sigmoid_call)
gaussian = op(_gaussian.gaussian, check=_gaussian.check_gaussian)
tensor = op(_forms.tensor, check=_checks.tensor_call)
tensor_approx = op(_forms.tensor_approx, check=_checks.tensor_approx_call)
# forms built from sdpa calls: their hops run on the chosen backend's sdpa
agent = _agent_attention.dispatched_agent
selective = _selective_attention.dispatched_selective

# heads: RCMHA's relative-score attention (depth-wise causal convolutions fused in the kernels)
relative_attention = op(
    _relative_conv.relative_attention, check=_relative_conv.check_relative_attention
)
# heads built from sdpa calls: GQA, its key-driven variants and DiffQKV
gqa = _grouped_query.gqa
kdgqa = _grouped_query.kdgqa
dgqa = _grouped_query.dgqa
pgqa = _grouped_query.pgqa
diffqkv = _sigma_diffqkv.diffqkv

# positions: attention built from sdpa calls, and an encoding generator
rope_alibi_harmonic = _rope_alibi.dispatched_rope_alibi_harmonic
positional_attention = _positional.dispatched_positional_attention
object_pe = _oat_encoding.object_pe

# local: neighborhood attention (fused kernels); routed, HiLo and DaViT attention on sdpa
neighborhood = op(
    _neighborhood_attention.neighborhood, check=_neighborhood_attention.check_neighborhood
)
neighbor_mask = _neighborhood_attention.neighbor_mask
bilevel_routing = _biformer.dispatched_bilevel_routing
hilo = _hilo_attention.dispatched_hilo
channel_attention = _davit.dispatched_channel_attention
window_attention = _davit.dispatched_window_attention

# kv: packed asymmetric quantisation of cached keys and values (ZipCache, SAQ)
quantize = op(_kv_quantize.quantize, check=_kv_quantize.check_quantize)
dequantize = op(_kv_quantize.dequantize, check=_kv_quantize.check_dequantize)
# kv: SnapKV's observation-window scoring and attention over a mixed-precision cache
window_scores = op(_kv_window.window_scores, check=_kv_window.check_window_scores)
mixed_attention = op(_kv_mixed.mixed_attention, check=_kv_mixed.check_mixed_attention)

# sparse: attention over per-head selected keys (the op KV selection methods feed)
sparse_attention = op(_sparse.sparse_attention, check=_sparse.check_sparse_attention)

# retrieval: RetrievalAttention's graph search (one greedy best-first search per query and head)
# and LeanVec's first-stage scores (float queries against 8-bit vectors)
graph_search_batch = op(
    _attention_index.graph_search_batch, check=_attention_index.check_graph_search
)
lvq_dot = op(_leanvec.lvq_dot, check=_leanvec.check_lvq_dot)

# recsys: SDIM's SimHash bucket aggregation
sdim = op(_sdim_hashing.sdim, check=_sdim_hashing.check_sdim)

__all__ = [
    "BackendUnavailable",
    "DTypeError",
    "FallbackWarning",
    "MissingOp",
    "ParameterError",
    "ShapeError",
    "UnknownBackend",
    "agent",
    "alibi",
    "alibi_slopes",
    "bilevel_routing",
    "channel_attention",
    "current_backend",
    "dequantize",
    "dgqa",
    "diffqkv",
    "flash",
    "gaussian",
    "gqa",
    "graph_search_batch",
    "hilo",
    "kdgqa",
    "known_backends",
    "lvq_dot",
    "mixed_attention",
    "neighbor_mask",
    "neighborhood",
    "object_pe",
    "pgqa",
    "positional_attention",
    "quantize",
    "relative_attention",
    "rope",
    "rope_alibi_harmonic",
    "sdim",
    "sdpa",
    "selective",
    "sigmoid",
    "sparse_attention",
    "tensor",
    "tensor_approx",
    "use_backend",
    "window_attention",
    "window_scores",
]
