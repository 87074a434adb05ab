"""The catalog: one record per mechanism, grouped by family, and the papers without one.

Each :class:`Mechanism` names its paper, its family, whether it is implemented, where its
reference function and tutorial live, and which dispatched ops carry its hot loops. ``qkv list``
and the docs' catalog page are generated from these records and from the backend registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["implemented", "planned"]

FAMILIES: dict[str, str] = {
    "core": "the baseline every other family builds on",
    "heads": "how heads share keys and values",
    "positions": "where position enters the score",
    "forms": "other score functions and shapes of attention",
    "local": "locality and routing (vision)",
    "kv": "KV-cache eviction, merging and quantisation",
    "sparse": "which keys a decoding query reads",
    "retrieval": "search and ranking with queries and keys",
    "recsys": "attention over features and behaviours",
    "analysis": "reading and editing attention in trained models",
}

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mechanism:
    """One catalog row.

    ``reference`` is ``"module:function"`` (resolved lazily by :meth:`reference_fn`);
    ``ops`` are the dispatched ops whose backend coverage ``qkv list`` reports for this row.
    """

    id: str
    family: str
    what: str
    paper: str
    arxiv: str | None = None
    code: str | None = None
    status: Status = "planned"
    reference: str | None = None
    ops: tuple[str, ...] = ()
    tutorial: str | None = None
    tests: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.tutorial is None:
            object.__setattr__(self, "tutorial", f"tutorials/{self.family}/{self.id}.py")
        if not self.tests:
            object.__setattr__(self, "tests", (f"tests/reference/test_{self.family}.py",))

    def reference_fn(self) -> Callable | None:
        """The reference function (or class), or ``None`` while the row is planned."""
        if self.reference is None:
            return None
        module, _, name = self.reference.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Paper:
    """A catalog paper that carries no query/key/value mechanism, with the reason."""

    title: str
    reason: str
    arxiv: str | None = None


def _m(id: str, family: str, what: str, paper: str, **kw) -> Mechanism:
    return Mechanism(id=id, family=family, what=what, paper=paper, **kw)


_KDGQA = "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention"
_RCMHA = "RCMHA: Relative Convolutional Multi-Head Attention for Natural Language Modelling"
_FULU = (
    "The Nature of Mathematical Modeling and Probabilistic Optimization Engineering "
    "in Generative AI"
)
_TENSOR = (
    "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention "
    "to Kronecker Computation"
)
_DAVIT = "DaViT: Dual Attention Vision Transformers"

MECHANISMS: tuple[Mechanism, ...] = (
    # core
    _m(
        "sdpa",
        "core",
        "softmax attention: scale, boolean/additive masks, causal, grouped KV "
        "heads; output, weights and log-sum-exp",
        "Attention Is All You Need",
        arxiv="1706.03762",
        status="implemented",
        reference="qkv.reference.core:sdpa",
        ops=("sdpa",),
        tests=("tests/reference/test_core.py",),
    ),
    _m(
        "flash",
        "core",
        "the same, tile by tile with the online softmax: no N x M matrix kept",
        "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness",
        arxiv="2205.14135",
        status="implemented",
        reference="qkv.reference.core:flash",
        ops=("flash",),
        tutorial="tutorials/core/sdpa.py",
        tests=("tests/reference/test_core.py",),
    ),
    _m(
        "rope",
        "core",
        "rotary position embedding, with position offsets",
        "RoFormer: Enhanced Transformer with Rotary Position Embedding",
        arxiv="2104.09864",
        status="implemented",
        reference="qkv.reference.core:rope",
        ops=("rope",),
        tutorial="tutorials/core/sdpa.py",
        tests=("tests/reference/test_core.py",),
    ),
    _m(
        "alibi",
        "core",
        "ALiBi linear attention biases and head slopes",
        "Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
        arxiv="2108.12409",
        status="implemented",
        reference="qkv.reference.core:alibi",
        tutorial="tutorials/core/sdpa.py",
        tests=("tests/reference/test_core.py",),
    ),
    # heads
    _m(
        "gqa",
        "heads",
        "MHA / MQA / GQA forward; MHA to GQA uptraining by mean-pooling KV heads",
        _KDGQA,
        arxiv="2408.08454",
        code="https://github.com/yjzhang0505/key-driven-gqa",
        status="implemented",
        reference="qkv.reference.heads:gqa",
        ops=("sdpa",),
        tests=("tests/reference/test_heads_gqa.py",),
        notes="G = H is MHA, G = 1 is MQA; uptrain() mean-pools K/V weights and biases of "
        "contiguous head groups; qkv.gqa runs its softmax on the chosen backend's sdpa; code "
        "facts from a fork (the paper's own repository was not found)",
    ),
    _m(
        "kdgqa",
        "heads",
        "key-norm-driven query allocation per forward pass",
        _KDGQA,
        arxiv="2408.08454",
        code="https://github.com/yjzhang0505/key-driven-gqa",
        tutorial="tutorials/heads/gqa.py",
        status="implemented",
        reference="qkv.reference.heads:kdgqa",
        ops=("sdpa",),
        tests=("tests/reference/test_heads_gqa.py",),
        notes="per-sample norm ratios by default; batch_coupled=True, normalisation='minmax' "
        "is the official code; equal norms fall back to uniform GQA instead of NaN",
    ),
    _m(
        "dgqa",
        "heads",
        "query allocation from key norms tracked over training (EMA or window)",
        _KDGQA,
        arxiv="2408.08454",
        code="https://github.com/yjzhang0505/key-driven-gqa",
        tutorial="tutorials/heads/gqa.py",
        status="implemented",
        reference="qkv.reference.heads:dgqa",
        ops=("sdpa",),
        tests=("tests/reference/test_heads_gqa.py",),
        notes="explicit DGQAState (cache, allocation, step); deterministic repair by default, "
        "the code's random repair with rng=; cache_update='code' is the code's cache rule",
    ),
    _m(
        "pgqa",
        "heads",
        "perturbed GQA",
        _KDGQA,
        arxiv="2408.08454",
        code="https://github.com/yjzhang0505/key-driven-gqa",
        tutorial="tutorials/heads/gqa.py",
        status="implemented",
        reference="qkv.reference.heads:pgqa",
        ops=("sdpa",),
        tests=("tests/reference/test_heads_gqa.py",),
        notes="as the code: uniform noise (diagonal zeroed) rescaled to each head output's "
        "statistics and subtracted from the outputs, in training and at inference; takes rng",
    ),
    _m(
        "diffqkv",
        "heads",
        "differentially compressed K and V, augmented Q head dim",
        "Sigma: Differential Rescaling of Query, Key and Value for Efficient Language Models",
        arxiv="2501.13629",
        status="implemented",
        reference="qkv.reference.heads:diffqkv",
        ops=("sdpa",),
        tests=("tests/reference/test_heads_diffqkv.py",),
        notes="no official code; augmented queries meet the smaller keys through a per-head "
        "map q_down (our reading); diffqkv_cost counts KV-cache bytes and decode FLOPs",
    ),
    _m(
        "rcmha",
        "heads",
        "depth-wise causal conv on Q/K/V + relative positional scores",
        _RCMHA,
        arxiv="2308.03429",
        code="https://github.com/hermansh-id/rcmha",
        status="implemented",
        reference="qkv.reference.heads:rcmha",
        ops=("relative_attention",),
        tests=("tests/reference/test_heads_rcmha.py", "tests/backends/test_relative_backends.py"),
        notes="labml score (q+u).k + q.R[d] + b[d] (Transformer-XL's v.R folded into b); "
        "memory via M = m + N keys; conv biases in rcmha, bias-free kernels fused in the op",
    ),
    _m(
        "mdha",
        "heads",
        "multi-DConv-head attention baseline",
        _RCMHA,
        arxiv="2308.03429",
        code="https://github.com/hermansh-id/rcmha",
        status="implemented",
        reference="qkv.reference.heads:mdha",
        tutorial="tutorials/heads/rcmha.py",
        tests=("tests/reference/test_heads_rcmha.py",),
        notes="causal depth-wise conv (K=3) on Q, K, V, then causal sdpa",
    ),
    _m(
        "rmha",
        "heads",
        "relative multi-head attention baseline",
        _RCMHA,
        arxiv="2308.03429",
        code="https://github.com/hermansh-id/rcmha",
        status="implemented",
        reference="qkv.reference.heads:rmha",
        ops=("relative_attention",),
        tutorial="tutorials/heads/rcmha.py",
        tests=("tests/reference/test_heads_rcmha.py", "tests/backends/test_relative_backends.py"),
    ),
    # positions
    _m(
        "rope_alibi_harmonic",
        "positions",
        "factored RoPE x ALiBi with a harmonic series",
        _FULU,
        arxiv="2410.18441",
        status="implemented",
        reference="qkv.reference.positions:rope_alibi_harmonic",
        ops=("sdpa",),
        tests=("tests/reference/test_positions_rope_alibi.py",),
        notes="formulation derived from the abstract (no code): RoPE-rotated scores minus "
        "m_h |p_i - p_j| with harmonic slopes m_h = 1/h; the weights factor into a RoPE term "
        "times a per-head decay e^(-|i-j|/h); the bias reaches sdpa as an additive mask",
    ),
    _m(
        "positional_attention",
        "positions",
        "attention weights from positional encodings only",
        "Positional Attention: Expressivity and Learnability of Algorithmic Computation",
        arxiv="2410.01686",
        code="https://github.com/opallab/positional_attention",
        status="implemented",
        reference="qkv.reference.positions:positional_attention",
        ops=("sdpa",),
        tests=("tests/reference/test_positions_positional_attention.py",),
        notes="q, k from positional encodings only (the official layout, checked against it in "
        "torch), values from the input; one sdpa call for the whole batch (folded into the "
        "value features); the layer's MLP belongs to the caller",
    ),
    _m(
        "object_pe",
        "positions",
        "object-level 3-D sinusoidal positional encoding",
        "OAT: Object-Level Attention Transformer for Gaze Scanpath Prediction",
        arxiv="2407.13335",
        code="https://github.com/HKUST-NISL/oat_eccv24",
        status="implemented",
        reference="qkv.reference.positions:object_pe",
        tests=("tests/reference/test_positions_object_pe.py",),
        notes="PositionalEncoding3D of the official code with its frequency choices original, "
        "exp1, exp2, linear (alpha 0.9); the run default, a learned table loaded from .npy, is "
        "data and not reproduced; an encoding generator, not dispatched",
    ),
    # forms
    _m(
        "sigmoid",
        "forms",
        "sigmoid attention with bias -log n, no row normalisation",
        "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
        arxiv="2409.04431",
        code="https://github.com/apple/ml-sigmoid-attention",
        status="implemented",
        reference="qkv.reference.forms:sigmoid",
        ops=("sigmoid",),
        tests=("tests/reference/test_forms_sigmoid.py", "tests/backends/test_sigmoid_backends.py"),
    ),
    _m(
        "selective",
        "forms",
        "query/position temperature scaling of the softmax, value temperature",
        "Selective Attention: Enhancing Transformer through Principled Context Control",
        code="https://github.com/umich-sota/selective_attention",
        arxiv="2411.12892",
        status="implemented",
        reference="qkv.reference.forms:selective",
        ops=("sdpa",),
        tests=("tests/reference/test_forms_selective.py",),
        notes="one sdpa call on tempered queries and values; position temperature as in the "
        "released code; token and value temperatures taken as arrays (the form "
        "1 + tanh(w.x + b) is offered by token_temperature)",
    ),
    _m(
        "agent",
        "forms",
        "agent tokens: softmax(Q A^T) softmax(A K^T) V with biases and DWC",
        "Agent Attention: On the Integration of Softmax and Linear Attention",
        arxiv="2312.08874",
        code="https://github.com/LeapLabTHU/Agent-Attention",
        status="implemented",
        reference="qkv.reference.forms:agent",
        ops=("sdpa",),
        tests=("tests/reference/test_forms_agent.py",),
        notes="two sdpa hops through agents pooled from the queries; qkv.agent runs them on "
        "the chosen backend",
    ),
    _m(
        "gaussian",
        "forms",
        "multi-head Gaussian adaptive attention",
        "Gaussian Adaptive Attention is All You Need",
        arxiv="2401.11143",
        code="https://github.com/gioannides/Gaussian-Adaptive-Attention",
        status="implemented",
        reference="qkv.reference.forms:gaussian",
        ops=("gaussian",),
        tests=(
            "tests/reference/test_forms_gaussian.py",
            "tests/backends/test_gaussian_backends.py",
        ),
    ),
    _m(
        "tensor",
        "forms",
        "triple-wise (Kronecker) attention, exact: streaming online softmax, no n x n^2 matrix",
        _TENSOR,
        arxiv="2310.04064",
        status="implemented",
        reference="qkv.reference.forms:tensor",
        ops=("tensor",),
        tests=("tests/reference/test_forms_tensor.py", "tests/backends/test_tensor_backends.py"),
    ),
    _m(
        "tensor_approx",
        "forms",
        "polynomial low-rank approximation of tensor attention",
        _TENSOR,
        arxiv="2310.04064",
        tutorial="tutorials/forms/tensor.py",
        status="implemented",
        reference="qkv.reference.forms:tensor_approx",
        ops=("tensor_approx",),
        tests=("tests/reference/test_forms_tensor.py",),
    ),
    _m(
        "ffnified",
        "forms",
        "FFNified attention: conv query-key, GELU, conv value",
        "MetaMixer Is All You Need",
        code="https://github.com/ysj9909/FFNet",
        arxiv="2406.02021",
        status="implemented",
        reference="qkv.reference.forms:ffnified",
        tests=("tests/reference/test_forms_ffnified.py",),
    ),
    _m(
        "icl_regression",
        "forms",
        "one-layer multi-head softmax attention for in-context regression",
        "In-Context Linear Regression Demystified",
        arxiv="2503.12734",
        code="https://github.com/XintianPan/ICL_linear",
        status="implemented",
        reference="qkv.reference.forms:icl_regression",
        tests=("tests/reference/test_forms_icl.py",),
    ),
    # local
    _m(
        "neighborhood",
        "local",
        "1-D/2-D/3-D neighborhood attention, dilation, causal",
        "Faster Neighborhood Attention",
        arxiv="2403.04690",
        code="https://github.com/SHI-Labs/NATTEN",
        status="implemented",
        reference="qkv.reference.local:neighborhood",
        ops=("neighborhood",),
        tests=(
            "tests/reference/test_local_neighborhood.py",
            "tests/backends/test_neighborhood_backends.py",
        ),
        notes="NATTEN semantics per axis (dilation groups, windows shifted inward at borders, "
        "causal, stride leaders, even kernels k/2 left and k/2 - 1 right); fused kernels "
        "gather neighbours by computed index (numba all ranks; Triton and CuPy 1-3 axes, "
        "CuPy compiled, not yet run on a GPU)",
    ),
    _m(
        "bilevel_routing",
        "local",
        "region top-k routing, then token attention (+ LePE)",
        "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        arxiv="2303.08810",
        code="https://github.com/rayleizhu/BiFormer",
        status="implemented",
        reference="qkv.reference.local:bilevel_routing",
        ops=("sdpa",),
        tests=("tests/reference/test_local_biformer.py",),
        notes="mean-pooled region routing (top-k, ties to the lower index), token attention "
        "batched over regions through qkv.sdpa, LePE; scale (H*D)^-1/2 as the official code",
    ),
    _m(
        "hilo",
        "local",
        "high-frequency window heads + low-frequency pooled-KV heads",
        "Fast Vision Transformers with HiLo Attention",
        arxiv="2205.13213",
        code="https://github.com/ziplab/LITv2",
        status="implemented",
        reference="qkv.reference.local:hilo",
        ops=("sdpa",),
        tests=("tests/reference/test_local_hilo.py",),
        notes="alpha = fraction of Lo-Fi heads (as the code); both groups run qkv.sdpa",
    ),
    _m(
        "channel_attention",
        "local",
        "channel-group attention",
        _DAVIT,
        arxiv="2204.03645",
        code="https://github.com/dingmyu/davit",
        status="implemented",
        reference="qkv.reference.local:channel_attention",
        ops=("sdpa",),
        tests=("tests/reference/test_local_davit.py",),
        notes="channels as tokens, scale C_g^-1/2; the code's (q, k, v) are the paper's (V, Q, K)",
    ),
    _m(
        "window_attention",
        "local",
        "spatial window attention",
        _DAVIT,
        arxiv="2204.03645",
        code="https://github.com/dingmyu/davit",
        status="implemented",
        reference="qkv.reference.local:window_attention",
        ops=("sdpa",),
        tutorial="tutorials/local/channel_attention.py",
        tests=("tests/reference/test_local_davit.py",),
        notes="non-shifted windows, bottom/right padding masked out (mask_padding=False: the "
        "code's unmasked zero padding)",
    ),
    # kv
    _m(
        "streaming",
        "kv",
        "attention sinks + recent window, with position re-rotation",
        "Efficient Streaming Language Models with Attention Sinks",
        arxiv="2309.17453",
        code="https://github.com/mit-han-lab/streaming-llm",
        status="implemented",
        reference="qkv.reference.kv:streaming",
        tests=("tests/reference/test_kv_streaming.py", "tests/lab/test_engine.py"),
        notes="a KVPolicy (StreamingLLM); position shift by re-rotating cached keys "
        "(rerotate=False: kvpress / KVCache-Factory variant); a kv-eval baseline",
    ),
    _m(
        "snapkv",
        "kv",
        "observation-window voting, pooling, per-head top-k",
        "SnapKV: LLM Knows What You are Looking for Before Generation",
        arxiv="2404.14469",
        code="https://github.com/FasterDecoding/SnapKV",
        status="implemented",
        reference="qkv.reference.kv:snapkv",
        ops=("window_scores",),
        tests=("tests/reference/test_kv_snapkv.py", "tests/reference/test_kv_window_scoring.py"),
        notes="a KVPolicy (SnapKV), prefill only; gqa='query' (official: per query head, union "
        "kept per KV head) or 'mean' (kvpress); kv-eval row uses gqa='mean'",
    ),
    _m(
        "duo",
        "kv",
        "retrieval vs streaming heads; gate optimisation on synthetic passkeys",
        "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming Heads",
        arxiv="2410.10819",
        code="https://github.com/mit-han-lab/duo-attention",
        status="implemented",
        reference="qkv.reference.kv:duo",
        tests=("tests/reference/test_kv_duo.py",),
        notes="gates trained by torch autograd on the lab decoder (kv.duo_training); no position "
        "shift; prefill runs full attention, the cache is cut after it",
    ),
    _m(
        "razor",
        "kv",
        "retrieval-head search; compensation token for dropped tokens",
        "RazorAttention: Efficient KV Cache Compression Through Retrieval Heads",
        arxiv="2407.15891",
        status="implemented",
        reference="qkv.reference.kv:razor",
        tests=("tests/reference/test_kv_razor.py",),
        notes="a KVPolicy (Razor) + echo/induction head search; compensation token weighted by "
        "|D| via extra['log_weight'] (compensated_attention); the engine reads it unweighted",
    ),
    _m(
        "taskkv",
        "kv",
        "semantic centre of heads, heterogeneous heads keep full cache",
        "Task-KV: Task-aware KV Cache Optimization via Semantic Differentiation of Attention Heads",
        arxiv="2501.15113",
        status="implemented",
        reference="qkv.reference.kv:taskkv",
        tests=("tests/reference/test_kv_taskkv.py",),
        notes="no official code: distance, head count and middle-token rule derived and documented",
    ),
    _m(
        "critic",
        "kv",
        "token-importance KV compression",
        "Scaling Test-Time Inference with Policy-Optimized, Dynamic Retrieval-Augmented "
        "Generation via KV Caching and Decoding",
        arxiv="2504.01281",
        status="implemented",
        reference="qkv.reference.kv:critic",
        tests=("tests/reference/test_kv_critic.py",),
        notes="a KVPolicy (Critic); no code and no formula found: importance = mean attention "
        "from the last window queries (importance='output' weights it by the value norm), "
        "sinks and window always kept, budget tokens per KV head (derived, documented)",
    ),
    _m(
        "zipcache",
        "kv",
        "normalised attention saliency; mixed-precision KV quantisation",
        "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token Identification",
        arxiv="2405.14256",
        code="https://github.com/ThisisBillhe/ZipCache",
        status="implemented",
        reference="qkv.reference.kv:zipcache",
        ops=("quantize", "dequantize", "mixed_attention"),
        tests=(
            "tests/reference/test_kv_zipcache.py",
            "tests/reference/test_kv_quantize.py",
            "tests/reference/test_kv_mixed_attention.py",
        ),
        notes="a KVPolicy (ZipCache): probe-query normalised saliency (denominator='causal': "
        "the official code's L - i), 4/2-bit channel-wise keys and channel-separable token-wise "
        "values; the engine holds dequantised floats, exact bits in extra['quantized_bits']",
    ),
    _m(
        "zipvl",
        "kv",
        "dynamic important-token ratio; mixed precision",
        "ZipVL: Efficient Large Vision-Language Models with Dynamic Token Sparsification",
        arxiv="2410.08584",
        status="implemented",
        reference="qkv.reference.kv:zipvl",
        ops=("quantize", "dequantize"),
        tests=("tests/reference/test_kv_zipvl.py",),
        notes="a KVPolicy (ZipVL): per layer the fewest tokens holding tau of the probe "
        "attention (the largest count of its KV heads), chosen by normalised score "
        "(select='accumulated': raw mass); rest='drop' (arXiv v2) or 'quantize' (v1, 4/2 bits); "
        "no official code",
    ),
    _m(
        "saq",
        "kv",
        "staircase adaptive quantisation of an MQA KV cache",
        _FULU,
        arxiv="2410.18441",
        status="implemented",
        reference="qkv.reference.kv:saq",
        ops=("quantize", "dequantize"),
        tests=("tests/reference/test_kv_saq.py",),
        tutorial="tutorials/kv/zipcache.py",
        notes="a KVPolicy (SAQ): fp residual, segments stepping 8 -> 4 -> 2 bits (our choice: "
        "the paper gives no widths); require_mqa=False applies it per KV head (kv-eval)",
    ),
    _m(
        "quota",
        "kv",
        "query-oriented token budget assignment across frames",
        "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video "
        "Comprehension",
        arxiv="2503.08689",
        code="https://github.com/MAC-AutoML/QuoTA",
        status="implemented",
        reference="qkv.reference.kv:quota",
        tests=("tests/reference/test_kv_quota.py",),
        notes="a KVPolicy (QuoTA) on a KV cache: frames = fixed-size prompt segments, query = "
        "the observation window; segment relevance = window attention mass, budget split with "
        "a floor, water-filling at segment sizes and Hamilton rounding, then top tokens per "
        "segment",
    ),
    # sparse
    _m(
        "sparse_attention",
        "sparse",
        "attention of each head over its own selected key indices, merged by log-sum-exp",
        "(shared op)",
        status="implemented",
        reference="qkv.reference.sparse:sparse_attention",
        ops=("sparse_attention",),
        tests=(
            "tests/reference/test_sparse_attention.py",
            "tests/backends/test_sparse_backends.py",
            "tests/lab/test_engine_slot_bias.py",
        ),
        notes="indices (B, H, S) or (B, H, N, S), -1 = empty slot (the ragged form); a key "
        "listed twice counts twice; optional per-slot bias (B, H, S), (B, Hkv, S) or "
        "(B, H, N, S) added to the scaled scores (log c = c copies, -inf = dropped; the engine "
        "passes RazorAttention's log |D| through it); merge_partials combines split "
        "selections; the lab engine's decode attention; numba single-pass kernel (GQA row "
        "sharing, serial below a work threshold), torch (index_select ops or Triton gather "
        "kernel), CuPy sparse_fwd.cu (compiled, not yet run on a GPU)",
    ),
    _m(
        "tokenselect",
        "sparse",
        "per-head soft voting on q.K, selection cache",
        "TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs via "
        "Dynamic Token-Level KV Cache Selection",
        arxiv="2411.02886",
        code="https://github.com/pzs19/TokenSelect",
        status="implemented",
        reference="qkv.reference.sparse:tokenselect",
        tests=("tests/reference/test_sparse_tokenselect.py",),
        notes="a KVSelector for the lab engine; selection cache on by default (off in the "
        "released code: cache_selection=False)",
    ),
    _m(
        "tidaldecode",
        "sparse",
        "token-selection layers, position-persistent selection",
        "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention",
        arxiv="2410.05076",
        code="https://github.com/DerrickYLJ/TidalDecode",
        status="implemented",
        reference="qkv.reference.sparse:tidaldecode",
        tests=("tests/reference/test_sparse_tidaldecode.py",),
        notes="a KVSelector for the lab engine; per-head top-k (the official PyTorch path)",
    ),
    _m(
        "hip",
        "sparse",
        "hierarchical tree-search top-k pruning",
        "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
        arxiv="2406.09827",
        code="https://github.com/DeepAuto-AI/hip-attention",
        status="implemented",
        reference="qkv.reference.sparse:hip",
        tests=("tests/reference/test_sparse_hip.py",),
        notes="tree search as a decode-time KVSelector; no block-sparse kernel",
    ),
    _m(
        "actqkv",
        "sparse",
        "activation-bias probe query, dynamic KV cut-off",
        "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs "
        "Inference",
        arxiv="2502.13542",
        code="https://github.com/MrXiaoaa/ActQKV",
        status="implemented",
        reference="qkv.reference.sparse:actqkv",
        tests=("tests/reference/test_sparse_actqkv.py",),
        notes="a KVSelector for the lab engine; per-layer linear entropy cut-off (the official "
        "cross-layer budget predictor and question term are not reproduced)",
    ),
    _m(
        "a2ats",
        "sparse",
        "windowed RoPE + query-aware vector quantisation of keys",
        "A^2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding and "
        "Query-Aware Vector Quantization",
        arxiv="2502.12665",
        code="https://github.com/junhuihe-hjh/A2ATS",
        status="implemented",
        reference="qkv.reference.sparse:a2ats",
        tests=("tests/reference/test_sparse_a2ats.py",),
        notes="a KVSelector for the lab engine (keys un-rotated from the cache); codebooks "
        "calibrated on the lab decoder by lab_codebooks (128 words, not the official 4096)",
    ),
    _m(
        "prflash",
        "sparse",
        "probabilistic block selection keeping the causal shape",
        _FULU,
        arxiv="2410.18441",
        status="implemented",
        reference="qkv.reference.sparse:prflash",
        tests=("tests/reference/test_sparse_prflash.py",),
        notes="tiles kept with probability keep**distance (diagonal and first column always), "
        "a block mask fed to qkv.flash; the FLOP saving is counted, not timed",
    ),
    # retrieval
    _m(
        "retrieval_attention",
        "retrieval",
        "attention-aware ANN index over keys",
        "RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval",
        arxiv="2409.10516",
        code="https://github.com/microsoft/RetrievalAttention",
        status="implemented",
        reference="qkv.reference.retrieval:retrieval_attention",
        ops=("graph_search_batch",),
        tests=(
            "tests/reference/test_retrieval_attention_index.py",
            "tests/backends/test_retrieval_graph_backends.py",
        ),
        notes="prefill query -> top-k key links projected RoarGraph-style (pivot + RNG pruning) "
        "onto a key graph; greedy best-first search counting keys scanned; static + retrieved "
        "merged by merge_partials; build_knn_index is the key-key kNN baseline",
    ),
    _m(
        "leanvec",
        "retrieval",
        "LeanVec-ID and LeanVec-OOD projections + quantised search",
        "LeanVec: Search your vectors faster by making them fit",
        arxiv="2312.16335",
        code="https://github.com/intel/ScalableVectorSearch",
        status="implemented",
        reference="qkv.reference.retrieval:leanvec",
        ops=("lvq_dot",),
        tests=(
            "tests/reference/test_retrieval_leanvec.py",
            "tests/backends/test_leanvec_backends.py",
        ),
        notes="the LeanVec index class (leanvec = LeanVec); 8-bit per-vector min/max codes "
        "(one LVQ level); inner-product search; first stage (lvq_dot) in numba (codes widened "
        "inside the dot product), torch and CuPy (one decode + batched product; CuPy not yet run "
        "on a GPU)",
    ),
    _m(
        "cosine_adapter",
        "retrieval",
        "query-dependent mapping of cosine scores + one threshold",
        "Relevance Filtering for Embedding-based Retrieval",
        arxiv="2408.04887",
        status="implemented",
        reference="qkv.reference.retrieval:cosine_adapter",
        tests=("tests/reference/test_retrieval_cosine_adapter.py",),
        notes="no official code; one linear layer -> (a, b[, p]) of a linear, sqrt, quadratic or "
        "power map, softplus keeps it increasing; BCE + Adam in NumPy (fit_cosine_adapter)",
    ),
    _m(
        "anncur",
        "retrieval",
        "CUR approximation of cross-encoder scores, then re-rank",
        "Efficient Nearest Neighbor Search for Cross-Encoder Models using Matrix Factorization",
        arxiv="2210.12579",
        code="https://github.com/iesl/anncur",
        status="implemented",
        reference="qkv.reference.retrieval:anncur",
        tests=("tests/reference/test_retrieval_anncur.py",),
        notes="cross-encoder = untrained joint MiniLM pass (qkv.lab.cross_encoder, cached "
        "48 x 160 matrix); anchor items join the re-ranked pool by default (reuse_anchors)",
    ),
    _m(
        "icr",
        "retrieval",
        "in-context re-ranking from attention, calibrated",
        "Attention in Large Language Models Yields Efficient Zero-Shot Re-Rankers",
        arxiv="2410.02642",
        code="https://github.com/OSU-NLP-Group/In-Context-Reranking",
        status="implemented",
        reference="qkv.reference.retrieval:icr",
        tests=("tests/reference/test_retrieval_icr.py",),
        notes="pure function of (L, H, N, N) attention and spans; masked N/A calibration "
        "(mean - 2 std per document); qkv.lab.icr_minilm runs it on MiniLM (512 tokens)",
    ),
    # recsys
    _m(
        "autoint",
        "recsys",
        "multi-head self-attention over feature fields with residual",
        "AutoInt: Automatic Feature Interaction Learning via Self-Attentive Neural Networks",
        arxiv="1810.11921",
        code="https://github.com/shichence/AutoInt",
        status="implemented",
        reference="qkv.reference.recsys:autoint",
        tests=("tests/reference/test_recsys_autoint.py",),
        notes="paper form by default; released_code=True adds the code's ReLU, 1/sqrt(d') and LayerNorm",
    ),
    _m(
        "dare",
        "recsys",
        "decoupled attention and representation embeddings",
        "Long-Sequence Recommendation Models Need Decoupled Embeddings",
        arxiv="2410.02604",
        code="https://github.com/thuml/DARE",
        status="implemented",
        reference="qkv.reference.recsys:dare",
        tests=("tests/reference/test_recsys_dare.py",),
        notes="weights independent of the representation table; values of the attention table",
    ),
    _m(
        "sdim",
        "recsys",
        "SimHash bucket sampling in place of target attention",
        "Sampling Is All You Need on Modeling Long-Term User Behaviors for CTR Prediction",
        arxiv="2205.10249",
        status="implemented",
        reference="qkv.reference.recsys:sdim",
        ops=("sdim",),
        tests=("tests/reference/test_recsys_sdim.py", "tests/backends/test_sdim_backends.py"),
        notes="numba groups behaviours by bucket once, then a binary search per candidate",
    ),
    _m(
        "mqsa",
        "recsys",
        "long/short multi-query self-attention + transition distillation",
        "Collaboration and Transition: Distilling Item Transitions into Multi-Query "
        "Self-Attention for Sequential Recommendation",
        code="https://github.com/zhuty16/MQSA-TED",
        status="implemented",
        reference="qkv.reference.recsys:mqsa",
        tests=("tests/reference/test_recsys_mqsa.py",),
        notes="window 1 with shared stacks (or alpha = 1) is the short-query model",
    ),
    _m(
        "coda_prompt",
        "recsys",
        "attention-weighted prompt components",
        "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free "
        "Continual Learning",
        arxiv="2211.13218",
        code="https://github.com/GT-RIPL/CODA-Prompt",
        status="implemented",
        reference="qkv.reference.recsys:coda_prompt",
        tests=("tests/reference/test_recsys_coda_prompt.py",),
    ),
    # analysis
    _m(
        "sink_metric",
        "analysis",
        "per-head sink importance and sink rate",
        "When Attention Sink Emerges in Language Models: An Empirical View",
        arxiv="2410.10781",
        code="https://github.com/sail-sg/Attention-Sink",
        status="implemented",
        reference="qkv.reference.analysis:sink_metric",
        tests=("tests/reference/test_analysis_sinks.py",),
        notes="sink rate is a fraction in [0, 1]; row_stochastic=False reads sigmoid weights",
    ),
    _m(
        "act",
        "analysis",
        "attention calibration of hidden sinks",
        "Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention Calibration",
        code="https://github.com/GATECH-EIC/ACT",
        status="implemented",
        reference="qkv.reference.analysis:act",
        tests=("tests/reference/test_analysis_act.py",),
        notes="heads are named by the caller (no head search); rows still sum to one",
    ),
    _m(
        "var",
        "analysis",
        "visual-sink detection and attention redistribution",
        "See What You Are Told: Visual Attention Sink in Large Multimodal Models",
        code="https://github.com/MICV-yonsei/VisAttnSink",
        status="implemented",
        reference="qkv.reference.analysis:var",
        tests=("tests/reference/test_analysis_var.py",),
        notes="no vision model here: a designated MiniLM text segment plays the image",
    ),
    _m(
        "retrieval_heads",
        "analysis",
        "retrieval score of heads on needle tasks",
        "Retrieval Head Mechanistically Explains Long-Context Factuality",
        arxiv="2404.15574",
        code="https://github.com/nightdessert/Retrieval_Head",
        status="implemented",
        reference="qkv.reference.analysis:retrieval_heads",
        tests=("tests/reference/test_analysis_retrieval.py",),
        notes="paper's deduplicated set by default; dedupe=False counts every step (official "
        "code); masking = zeroing the head's output on the lab decoder",
    ),
    _m(
        "circuits",
        "analysis",
        "direct logit attribution, activation patching, QK/OV subspaces",
        "Does Circuit Analysis Interpretability Scale? Evidence from Multiple Choice "
        "Capabilities in Chinchilla",
        arxiv="2307.09458",
        status="implemented",
        reference="qkv.reference.analysis:circuits",
        tests=("tests/reference/test_analysis_circuits.py",),
        notes="on the lab decoder; frozen final-norm scale; patching replaces a head's output at "
        "every position; QK/OV subspaces from the uncentred SVD of the head's rotated "
        "queries/keys and values; no official code released",
    ),
    _m(
        "vocab_keys",
        "analysis",
        "next-token softmax as query x vocabulary keys",
        "Correlation and Navigation in the Vocabulary Key Representation Space of Language Models",
        arxiv="2410.02284",
        status="implemented",
        reference="qkv.reference.analysis:vocab_keys",
        tests=("tests/reference/test_analysis_vocab.py",),
        notes="on the lab decoder (128 tokens); navigation applied to the query (projection off "
        "the explored keys' span), not in-context as the paper's ICN; no official code found",
    ),
    _m(
        "minilm_distill",
        "analysis",
        "self-attention distribution and value-relation distillation",
        "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained "
        "Transformers",
        arxiv="2002.10957",
        status="implemented",
        reference="qkv.reference.analysis:minilm_distill",
        tests=("tests/reference/test_analysis_distill.py",),
        notes="analytic gradients checked against torch autograd and finite differences",
    ),
    _m(
        "margin_mse",
        "analysis",
        "Margin-MSE cross-architecture distillation loss for rankers",
        "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation",
        arxiv="2010.02666",
        status="implemented",
        reference="qkv.reference.analysis:margin_mse",
        tests=("tests/reference/test_analysis_distill.py",),
    ),
)

PAPERS_WITHOUT_MECHANISM: tuple[Paper, ...] = tuple(
    Paper(title, reason)
    for title, reason in (
        (
            "PUMGPT: A Large Vision-Language Model for Product Understanding",
            "a trained product model; its layer-wise adapters are not specified beyond the abstract",
        ),
        (
            "QVHighlights: Detecting Moments and Highlights in Videos via Natural Language Queries",
            "a data set and a DETR-style baseline model",
        ),
        (
            "QUEACO: Borrowing Treasures from Weakly-labeled Behavior Data for Query Attribute "
            "Value Extraction",
            "teacher-student NER training on weak labels",
        ),
        (
            "Multi-Label Zero-Shot Product Attribute-Value Extraction (HyperPAVE)",
            "hypergraph link prediction",
        ),
        (
            "Cross-Domain Product Representation Learning for Rich-Content E-Commerce",
            "a data set and a multimodal representation model",
        ),
        (
            "Manipulating Large Language Models to Increase Product Visibility",
            "adversarial prompt text, no attention mechanism",
        ),
        (
            "Unified Dual-Intent Translation for Joint Modeling of Search and Recommendation",
            "translation-based embeddings, no attention mechanism specified",
        ),
        (
            "PerSRV: Personalized Sticker Retrieval with Vision-Language Model",
            "a VLM pipeline and clustering",
        ),
        (
            "Leveraging LLMs for Enhanced Product Descriptions in eCommerce",
            "fine-tuning for text generation",
        ),
        (
            "Exploring the Viability of Synthetic Query Generation for Relevance Prediction",
            "data generation study",
        ),
        (
            "Using clarification questions to improve software developers' Web search",
            "question recommendation",
        ),
        ("SIFT: Grounding LLM Reasoning in Contexts via Stickers", "a prompting procedure"),
        (
            "KITAB: Evaluating LLMs on Constraint Satisfaction for Information Retrieval",
            "a data set",
        ),
        ("Query Understanding via Intent Description Generation", "a text-generation task"),
        (
            "Knowledge-Augmented Large Language Models for Personalized Contextual Query "
            "Suggestion",
            "a prompting system",
        ),
        (
            "Hallucinations or Attention Misdirection? The Path to Strategic Value Extraction in "
            "Business Using Large Language Models (PGI)",
            "a prompting framework",
        ),
    )
)

_BY_ID = {m.id: m for m in MECHANISMS}


def ids() -> list[str]:
    """Every mechanism id, in catalog order."""
    return [m.id for m in MECHANISMS]


def get(mechanism_id: str) -> Mechanism:
    """The record of one id; ``KeyError`` names the close matches."""
    try:
        return _BY_ID[mechanism_id]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(mechanism_id, _BY_ID, n=3)
        raise KeyError(
            f"unknown mechanism id {mechanism_id!r}"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        ) from None


def implemented() -> list[Mechanism]:
    return [m for m in MECHANISMS if m.status == "implemented"]


def by_family() -> dict[str, list[Mechanism]]:
    return {f: [m for m in MECHANISMS if m.family == f] for f in FAMILIES}
