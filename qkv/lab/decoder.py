r"""A tiny decoder-only transformer whose inference runs through qkv ops, on any backend.

The model is a Llama-style stack, small enough to train on a laptop CPU
(``qkv lab train-decoder``) and large enough to show what KV-cache methods act on: attention
sinks, retrieval heads, induction. Each of the $L$ blocks is pre-norm,

$$
h = x + W_O\,\operatorname{Attn}\big(\operatorname{RoPE}(W_Q\,\bar x),\,
        \operatorname{RoPE}(W_K\,\bar x),\, W_V\,\bar x\big), \quad \bar x = \operatorname{RMSNorm}(x),
$$
$$
x' = h + W_2\big(\operatorname{SiLU}(W_1 \bar h) \odot W_3 \bar h\big), \quad
\bar h = \operatorname{RMSNorm}(h),
$$

with $\operatorname{RMSNorm}(x) = g \odot x / \sqrt{\operatorname{mean}(x^2) + \epsilon}$, grouped KV
heads (8 query heads read 2 KV heads), causal softmax attention and tied input/output
embeddings: $\text{logits} = \operatorname{RMSNorm}(x_L)\,E^\top$.

The attention is :func:`qkv.sdpa` and the rotary embedding :func:`qkv.rope` (adjacent pairs,
base $10^4$), both dispatched, so the forward runs on whichever backend is selected. The
``attention`` argument of :func:`forward` replaces the attention of any layer (and, through
:func:`replace_heads`, of any head) by another mechanism. :mod:`qkv.lab.train` holds the torch
twin used for training; :mod:`qkv.lab.engine` the incremental (KV-cache) form of this forward.

Weights are kept in ``qkv/data/decoder_passkey.npz`` as float16 and computed with in float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import qkv
from qkv.errors import ParameterError, ShapeError

Array = np.ndarray
#: The shipped weights.
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "data" / "decoder_passkey.npz"
#: The command that (re)generates them.
COMMAND = "qkv lab train-decoder"

#: ``attention(layer, q, k, v) -> out``: ``q (B, H, N, Dh)``, ``k, v (B, Hkv, N, Dh)`` already
#: rotated; returns ``(B, H, N, Dh)``. The default is causal :func:`qkv.sdpa`.
AttentionFn = Callable[[int, Array, Array, Array], Array]


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the decoder.

    Attributes:
        vocab: vocabulary size.
        d_model: residual width.
        n_layers: blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (``n_heads % n_kv_heads == 0``).
        d_ff: hidden width of the gated MLP.
        max_len: positions the model was trained on; longer sequences are refused.
        rope_base: RoPE frequency base.
        eps: RMSNorm epsilon.
    """

    vocab: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    d_ff: int = 384
    max_len: int = 528
    rope_base: float = 10000.0
    eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in ("vocab", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 1:
                raise ParameterError(f"{f}: expected a positive int, got {value!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ParameterError(
                f"d_model: expected a multiple of n_heads={self.n_heads} with an even head "
                f"dim, got {self.d_model}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ParameterError(
                f"n_kv_heads: expected a divisor of n_heads={self.n_heads}, got {self.n_kv_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One block's weights (``x @ W`` convention: inputs on the left).

    Attributes:
        attn_norm: RMSNorm gain before attention ``(d_model,)``.
        wq: query projection ``(d_model, n_heads * head_dim)``.
        wk: key projection ``(d_model, n_kv_heads * head_dim)``.
        wv: value projection ``(d_model, n_kv_heads * head_dim)``.
        wo: output projection ``(n_heads * head_dim, d_model)``.
        mlp_norm: RMSNorm gain before the MLP ``(d_model,)``.
        w1: gate projection ``(d_model, d_ff)``.
        w3: up projection ``(d_model, d_ff)``.
        w2: down projection ``(d_ff, d_model)``.
    """

    attn_norm: Array
    wq: Array
    wk: Array
    wv: Array
    wo: Array
    mlp_norm: Array
    w1: Array
    w3: Array
    w2: Array


@dataclass(frozen=True, eq=False)
class DecoderWeights:
    """The whole model: config, embedding ``(vocab, d_model)``, blocks, final norm gain."""

    config: DecoderConfig
    embed: Array
    layers: tuple[LayerWeights, ...]
    final_norm: Array

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of every named array (the npz keys)."""
        return expected_shapes(self.config)

    def to_arrays(self) -> dict[str, Array]:
        """Flat ``name -> array`` dict (``embed``, ``final_norm``, ``layers.<i>.<name>``)."""
        out = {"embed": self.embed, "final_norm": self.final_norm}
        for i, layer in enumerate(self.layers):
            for f in fields(LayerWeights):
                out[f"layers.{i}.{f.name}"] = getattr(layer, f.name)
        return out

    def astype(self, dtype: np.dtype | type) -> DecoderWeights:
        """A copy with every array cast to ``dtype``."""
        arrays = {k: v.astype(dtype) for k, v in self.to_arrays().items()}
        return from_arrays(self.config, arrays)


def expected_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every weight array of a model with ``config``, by npz key."""
    d, hd = config.d_model, config.head_dim
    per_layer = {
        "attn_norm": (d,),
        "wq": (d, config.n_heads * hd),
        "wk": (d, config.n_kv_heads * hd),
        "wv": (d, config.n_kv_heads * hd),
        "wo": (config.n_heads * hd, d),
        "mlp_norm": (d,),
        "w1": (d, config.d_ff),
        "w3": (d, config.d_ff),
        "w2": (config.d_ff, d),
    }
    shapes = {"embed": (config.vocab, d), "final_norm": (d,)}
    for i in range(config.n_layers):
        shapes.update({f"layers.{i}.{k}": s for k, s in per_layer.items()})
    return shapes


def from_arrays(config: DecoderConfig, arrays: Mapping[str, Array]) -> DecoderWeights:
    """Build weights from a flat dict, checking every name and shape against ``config``."""
    for name, shape in expected_shapes(config).items():
        if name not in arrays:
            raise ShapeError(f"{name}: expected an array of shape {shape}, got none")
        if tuple(arrays[name].shape) != shape:
            raise ShapeError(f"{name}: expected shape {shape}, got {tuple(arrays[name].shape)}")
    layers = tuple(
        LayerWeights(**{f.name: arrays[f"layers.{i}.{f.name}"] for f in fields(LayerWeights)})
        for i in range(config.n_layers)
    )
    return DecoderWeights(config, arrays["embed"], layers, arrays["final_norm"])


def init_weights(config: DecoderConfig, seed: int = 0) -> DecoderWeights:
    """Random float32 weights: normal with std ``1/sqrt(fan_in)`` (``1/sqrt(d_model)`` for the
    embedding), output projections scaled down by ``sqrt(2 n_layers)``, unit norm gains."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm"):
            arrays[name] = np.ones(shape, dtype=np.float32)
            continue
        std = 1.0 / np.sqrt(shape[0] if name != "embed" else shape[1])
        if name.endswith(("wo", "w2")):
            std /= np.sqrt(2 * config.n_layers)
        arrays[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    return from_arrays(config, arrays)


def save(weights: DecoderWeights, path: str | Path, **meta: object) -> Path:
    """Write weights as float16 npz with the config (and ``meta``) as JSON under ``config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.astype(np.float16) for k, v in weights.to_arrays().items()}
    header = {"config": asdict(weights.config), "command": COMMAND, **meta}
    np.savez_compressed(path, config=np.array(json.dumps(header)), **arrays)
    return path


def _regenerate(path: Path) -> str:
    return f"regenerate it with `{COMMAND}` (it writes {DEFAULT_PATH.name} into qkv/data)"


def load(path: str | Path | None = None) -> DecoderWeights:
    """Read weights written by :func:`save` (default: the shipped model), as float32.

    Raises:
        FileNotFoundError: the file is missing (the message says how to regenerate it).
        ShapeError: an array is missing or has the wrong shape for the stored config.
    """
    path = Path(DEFAULT_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder weights {path}: file not found; {_regenerate(path)}")
    with np.load(path, allow_pickle=False) as z:
        if "config" not in z.files:
            raise ShapeError(f"decoder weights {path}: no 'config' entry; {_regenerate(path)}")
        header = json.loads(str(z["config"]))
        arrays = {k: z[k].astype(np.float32) for k in z.files if k != "config"}
    config = DecoderConfig(**header["config"])
    try:
        return from_arrays(config, arrays)
    except ShapeError as exc:
        raise ShapeError(f"decoder weights {path}: {exc}; {_regenerate(path)}") from None


def load_header(path: str | Path | None = None) -> dict:
    """The JSON header stored with the weights (config, training summary)."""
    path = Path(DEFAULT_PATH if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder weights {path}: file not found; {_regenerate(path)}")
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["config"]))


# ----------------------------------------------------------------------------- the forward


def rms_norm(x: Array, gain: Array, eps: float) -> Array:
    r"""$g \odot x / \sqrt{\operatorname{mean}(x^2) + \epsilon}$ over the last axis."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def silu(x: Array) -> Array:
    r"""$x\,\sigma(x)$, written to stay finite for large $|x|$."""
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def split_heads(x: Array, n_heads: int) -> Array:
    """``(B, N, n_heads * Dh) -> (B, n_heads, N, Dh)``."""
    B, N, HD = x.shape
    return x.reshape(B, N, n_heads, HD // n_heads).transpose(0, 2, 1, 3)  # (B, heads, N, Dh)


def merge_heads(x: Array) -> Array:
    """``(B, H, N, Dh) -> (B, N, H * Dh)``."""
    B, H, N, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, N, H * Dh)  # (B, N, H * Dh)


def project_qkv(
    config: DecoderConfig, layer: LayerWeights, x: Array, positions: Array | int | None
) -> tuple[Array, Array, Array]:
    """Normalise, project and (unless ``positions`` is None) rotate one block's q and k.

    Args:
        config: the model sizes.
        layer: the block's weights.
        x: residual stream ``(B, N, d_model)``.
        positions: RoPE positions ``(N,)``, the first position (an int) of ``N`` consecutive,
            or ``None`` to return ``q`` and ``k`` unrotated.

    Returns:
        ``q (B, H, N, Dh)``, ``k (B, Hkv, N, Dh)`` and ``v (B, Hkv, N, Dh)``.
    """
    xn = rms_norm(x, layer.attn_norm, config.eps)  # (B, N, d)
    q = split_heads(xn @ layer.wq, config.n_heads)  # (B, H, N, Dh)
    k = split_heads(xn @ layer.wk, config.n_kv_heads)  # (B, Hkv, N, Dh)
    v = split_heads(xn @ layer.wv, config.n_kv_heads)  # (B, Hkv, N, Dh)
    if positions is None:
        return q, k, v
    where = {"offset": positions} if isinstance(positions, int) else {"positions": positions}
    q = qkv.rope(q, base=config.rope_base, **where)
    k = qkv.rope(k, base=config.rope_base, **where)
    return q, k, v


def finish_block(config: DecoderConfig, layer: LayerWeights, x: Array, attn: Array) -> Array:
    """Residual stream after a block, given its attention output ``attn (B, H, N, Dh)``."""
    h = x + merge_heads(attn) @ layer.wo  # (B, N, d)
    hn = rms_norm(h, layer.mlp_norm, config.eps)  # (B, N, d)
    return h + (silu(hn @ layer.w1) * (hn @ layer.w3)) @ layer.w2


def logits_of(weights: DecoderWeights, x: Array) -> Array:
    """Next-token logits ``(B, N, vocab)`` from the last residual stream ``(B, N, d_model)``."""
    return rms_norm(x, weights.final_norm, weights.config.eps) @ weights.embed.T


def causal_attention(layer: int, q: Array, k: Array, v: Array) -> Array:
    """The model's own attention: causal :func:`qkv.sdpa` (``layer`` is unused)."""
    return qkv.sdpa(q, k, v, causal=True)


def check_tokens(config: DecoderConfig, tokens: Array, *, name: str = "tokens") -> Array:
    """``tokens`` as int64 ``(B, N)`` (a 1-D prompt gets ``B = 1``), within vocab and positions."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]  # (1, N)
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ShapeError(
            f"{name}: expected integer token ids (N,) or (B, N), got {tokens.dtype} {tokens.shape}"
        )
    if tokens.min() < 0 or tokens.max() >= config.vocab:
        raise ParameterError(
            f"{name}: expected ids in [0, {config.vocab}), got [{tokens.min()}, {tokens.max()}]"
        )
    if tokens.shape[1] > config.max_len:
        raise ParameterError(
            f"{name}: expected at most max_len={config.max_len} positions (the trained range; "
            f"RoPE is not extrapolated), got {tokens.shape[1]}"
        )
    return tokens.astype(np.int64, copy=False)


def forward(
    weights: DecoderWeights,
    tokens: Array,
    *,
    attention: AttentionFn | Mapping[int, AttentionFn] | None = None,
    return_attention: bool = False,
) -> Array | tuple[Array, Array]:
    """Logits of every position, through :func:`qkv.rope` and :func:`qkv.sdpa`.

    Args:
        weights: the model.
        tokens: token ids ``(B, N)`` or ``(N,)``; ``N <= max_len``.
        attention: replaces the causal attention, either everywhere (a callable) or in the
            layers of a ``{layer: callable}`` mapping; see :data:`AttentionFn`.
        return_attention: also return the model's causal attention weights
            ``(L, B, H, N, N)`` (computed by :func:`qkv.sdpa`; for plots).

    Returns:
        ``logits (B, N, vocab)`` float32, and the attention weights if asked.
    """
    config = weights.config
    tokens = check_tokens(config, tokens)
    x = weights.embed[tokens]  # (B, N, d)
    maps = []
    for i, layer in enumerate(weights.layers):
        q, k, v = project_qkv(config, layer, x, 0)
        fn = attention.get(i) if isinstance(attention, Mapping) else attention
        if return_attention:
            out, p = qkv.sdpa(q, k, v, causal=True, return_weights=True)
            maps.append(p)
            if fn is not None:
                out = fn(i, q, k, v)
        else:
            out = (fn or causal_attention)(i, q, k, v)
        x = finish_block(config, layer, x, out)
    logits = logits_of(weights, x)
    return (logits, np.stack(maps)) if return_attention else logits


def replace_heads(heads: Mapping[int, set[int] | tuple[int, ...]], fn: AttentionFn) -> AttentionFn:
    """An attention that uses ``fn`` for the listed query heads of each layer, causal sdpa else.

    Args:
        heads: ``{layer: query heads}`` whose output comes from ``fn``.
        fn: the replacement attention (called with the whole layer's ``q, k, v``).

    Returns:
        An :data:`AttentionFn` for :func:`forward`.
    """

    def mixed(layer: int, q: Array, k: Array, v: Array) -> Array:
        out = causal_attention(layer, q, k, v)
        chosen = sorted(heads.get(layer, ()))
        if chosen:
            out = out.copy()
            out[:, chosen] = fn(layer, q, k, v)[:, chosen]
        return out

    return mixed


def greedy(weights: DecoderWeights, prompt: Array, n_new: int) -> Array:
    """Greedy continuation by full recomputation (no cache): ``n_new`` ids ``(B, n_new)``."""
    tokens = check_tokens(weights.config, prompt, name="prompt")
    for _ in range(n_new):
        nxt = forward(weights, tokens)[:, -1].argmax(-1)  # (B,)
        tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
    return tokens[:, -n_new:] if n_new else tokens[:, :0]
