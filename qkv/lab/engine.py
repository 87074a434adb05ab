r"""A KV-cache engine for the lab decoder: prefill, greedy decoding, pluggable KV methods.

:func:`prefill` runs the prompt through :mod:`qkv.lab.decoder` (full causal attention by
:func:`qkv.sdpa`) and fills a :class:`KVCache`; :func:`decode_step` feeds one token, whose
attention over the cache is :func:`qkv.sparse_attention`; :func:`generate` does both and greedy
decoding. A :class:`~qkv.reference.kv.policy.KVPolicy` compresses each layer's cache after the
prefill (and after every step when the policy says so); a
:class:`~qkv.reference.kv.policy.KVSelector` picks, at each step, the cached keys each query head
reads. Every policy result is checked before it is used, so a policy that returns indices out of
range fails with a clear error instead of reading garbage.

The cache of each layer is dense and padded: per KV head up to ``C`` slots of rotated keys and
values with the token index (``-1`` = empty) and the RoPE position of each. Heads may hold
different numbers of tokens. The next token's position is kept per KV head, so a policy may
re-assign positions (StreamingLLM's position shift); a decode step whose position would pass
the model's ``max_len`` is refused, since RoPE is not extrapolated.

With no policy and no selector, the logits equal those of the full forward (and of the torch
twin) up to float32 rounding. Batches are supported (all rows share the prompt length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

import qkv
from qkv.errors import ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.reference.kv.policy import CacheView, KVPolicy, KVSelector, check_kept

Array = np.ndarray


@dataclass(frozen=True, eq=False)
class LayerCache:
    """One layer's cache.

    Attributes:
        keys: rotated keys ``(B, Hkv, C, Dh)``; occupied slots first, in token order.
        values: values ``(B, Hkv, C, Dh)``.
        indices: token index of each slot ``(B, Hkv, C)`` int64, ``-1`` where empty.
        positions: RoPE position each key is rotated at ``(B, Hkv, C)`` int64.
        next_position: the next token's position per KV head ``(B, Hkv)`` int64.
        extra: state a policy keeps (compensation tokens, quantisation parameters, ...).
    """

    keys: Array
    values: Array
    indices: Array
    positions: Array
    next_position: Array
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> Array:
        """Occupied slots per KV head ``(B, Hkv)``."""
        return (self.indices >= 0).sum(axis=-1)

    def nbytes(self) -> int:
        """Bytes of the occupied keys and values plus every array in ``extra``.

        A quantising policy stores dequantised floats here and the exact size of its quantised
        form in ``extra["quantized_bits"]`` (packed codes, scales, zero points, and any slots it
        keeps in full precision); that form covers the tokens seen when it last compressed
        (``extra["quantized_tokens"]``, recorded by the engine). Those slots count as
        ``quantized_bits / 8`` bytes (rounded up); slots of later tokens count as the floats
        held.
        """
        per_token = (self.keys.shape[-1] + self.values.shape[-1]) * self.keys.itemsize
        extra = sum(np.asarray(a).nbytes for a in self.extra.values() if hasattr(a, "nbytes"))
        if "quantized_bits" not in self.extra:
            return int(self.lengths.sum()) * per_token + extra
        later = (self.indices >= self.extra["quantized_tokens"]).sum()  # slots after it ran
        return -(-int(self.extra["quantized_bits"]) // 8) + int(later) * per_token + extra


@dataclass(frozen=True, eq=False)
class KVCache:
    """The whole model's cache: one :class:`LayerCache` per layer and the tokens seen."""

    layers: tuple[LayerCache, ...]
    n_tokens: int

    def lengths(self) -> Array:
        """Occupied slots ``(L, B, Hkv)``."""
        return np.stack([c.lengths for c in self.layers])

    def nbytes(self) -> int:
        """Bytes held by every layer (see :meth:`LayerCache.nbytes`)."""
        return sum(c.nbytes() for c in self.layers)


@dataclass(frozen=True, eq=False)
class Generation:
    """The result of :func:`generate`.

    Attributes:
        tokens: generated ids ``(B, n_new)``.
        logits: the logits each generated token was chosen from ``(B, n_new, vocab)``.
        cache: the cache after the last step.
        prefill_seconds: wall time of the prefill (and its compression).
        decode_seconds: wall time per decode step (one per generated token after the first).
    """

    tokens: Array
    logits: Array
    cache: KVCache
    prefill_seconds: float
    decode_seconds: list[float]


def _view(weights: dec.DecoderWeights, c: LayerCache, n_tokens: int, q: Array) -> CacheView:
    return CacheView(
        keys=c.keys,
        values=c.values,
        indices=c.indices,
        positions=c.positions,
        next_position=c.next_position,
        n_tokens=n_tokens,
        queries=q,
        extra=c.extra,
        rope_base=weights.config.rope_base,
    )


def _compress(
    weights: dec.DecoderWeights, policy: KVPolicy, layer: int, c: LayerCache, n: int, q: Array
) -> LayerCache:
    kept = policy.compress(layer, _view(weights, c, n, q))
    kept = check_kept(kept, _view(weights, c, n, q), who=f"policy {policy!r} (layer {layer})")
    return LayerCache(
        keys=kept.keys,
        values=kept.values,
        indices=np.asarray(kept.indices, dtype=np.int64),
        positions=np.asarray(kept.positions, dtype=np.int64),
        next_position=np.asarray(kept.next_position, dtype=np.int64),
        # a quantised form (extra["quantized_bits"]) covers the n tokens seen so far
        extra={**kept.extra, **({"quantized_tokens": n} if "quantized_bits" in kept.extra else {})},
    )


def _check_policy(policy: Any, selector: Any) -> None:
    if policy is not None and not isinstance(policy, KVPolicy):
        raise TypeError(f"policy: expected a KVPolicy or None, got {type(policy).__name__}")
    if selector is not None and not isinstance(selector, KVSelector):
        raise TypeError(f"selector: expected a KVSelector or None, got {type(selector).__name__}")


def prefill(
    weights: dec.DecoderWeights, prompt: Array, *, policy: KVPolicy | None = None
) -> tuple[Array, KVCache]:
    """Run the prompt with full causal attention, cache its keys and values, compress.

    Args:
        weights: the model.
        prompt: token ids ``(B, N)`` or ``(N,)``, ``N <= max_len``.
        policy: compresses each layer's cache afterwards (``None``: keep everything).

    Returns:
        ``logits (B, N, vocab)`` of the prompt and the cache.
    """
    _check_policy(policy, None)
    config = weights.config
    tokens = dec.check_tokens(config, prompt, name="prompt")
    B, N = tokens.shape
    x = weights.embed[tokens]  # (B, N, d)
    layers = []
    for i, lw in enumerate(weights.layers):
        q, k, v = dec.project_qkv(config, lw, x, 0)
        x = dec.finish_block(config, lw, x, qkv.sdpa(q, k, v, causal=True))
        where = np.broadcast_to(np.arange(N), (B, config.n_kv_heads, N)).copy()  # (B, Hkv, N)
        c = LayerCache(k, v, where, where.copy(), np.full((B, config.n_kv_heads), N))
        layers.append(_compress(weights, policy, i, c, N, q) if policy is not None else c)
    return dec.logits_of(weights, x), KVCache(tuple(layers), N)


def _rope_per_kv_head(x: Array, positions: Array, group: int, base: float) -> Array:
    """Rotate ``x (B, heads, 1, Dh)`` whose heads come in groups of ``group`` per KV head, each
    group at its own position ``positions (B, Hkv)``."""
    out = np.empty_like(x)
    for g in range(positions.shape[1]):
        heads = slice(g * group, (g + 1) * group)
        out[:, heads] = qkv.rope(x[:, heads], positions=positions[:, g : g + 1], base=base)
    return out


def _append(c: LayerCache, k: Array, v: Array, token: int) -> LayerCache:
    """The cache with the new token's ``k, v (B, Hkv, 1, Dh)`` in each head's first free slot."""
    B, Hkv, C, _ = c.keys.shape
    slot = c.lengths  # (B, Hkv)
    if int(slot.max()) >= C:  # grow by one slot
        pad = [(0, 0), (0, 0), (0, 1)]
        c = replace(
            c,
            keys=np.pad(c.keys, [*pad, (0, 0)]),
            values=np.pad(c.values, [*pad, (0, 0)]),
            indices=np.pad(c.indices, pad, constant_values=-1),
            positions=np.pad(c.positions, pad),
        )
    keys, values = c.keys.copy(), c.values.copy()
    indices, positions = c.indices.copy(), c.positions.copy()
    b, h = np.meshgrid(np.arange(B), np.arange(Hkv), indexing="ij")  # (B, Hkv) each
    keys[b, h, slot] = k[:, :, 0]
    values[b, h, slot] = v[:, :, 0]
    indices[b, h, slot] = token
    positions[b, h, slot] = c.next_position
    return replace(
        c,
        keys=keys,
        values=values,
        indices=indices,
        positions=positions,
        next_position=c.next_position + 1,
    )


def _selection(
    selector: KVSelector | None, layer: int, view: CacheView, n_heads: int, group: int
) -> Array:
    """Slots each query head reads ``(B, H, S)``: the selector's, checked, or every occupied one."""
    B, Hkv, C = view.indices.shape
    if selector is None:
        slots = np.where(view.valid, np.arange(C), -1)  # (B, Hkv, C)
        return np.repeat(slots, group, axis=1)  # (B, H, C)
    idx = np.asarray(selector.select(layer, view))
    who = f"selector {selector!r} (layer {layer})"
    if idx.ndim != 3 or idx.shape[:2] != (B, n_heads) or not np.issubdtype(idx.dtype, np.integer):
        raise ShapeError(
            f"{who}: expected integer slots (B, H, S)=({B}, {n_heads}, S), got "
            f"{idx.dtype} {idx.shape}"
        )
    if idx.size and (idx.min() < -1 or idx.max() >= C):
        raise ParameterError(
            f"{who}: returned cache slots in [{idx.min()}, {idx.max()}], expected slots in "
            f"[0, {C}) or -1 for none"
        )
    occupied = np.repeat(view.valid, group, axis=1)  # (B, H, C)
    hit = np.take_along_axis(occupied, np.where(idx >= 0, idx, 0), axis=-1)
    if not np.all(hit | (idx < 0)):
        raise ParameterError(f"{who}: returned empty cache slots")
    return idx.astype(np.int64, copy=False)


def _slot_bias(c: LayerCache, idx: Array, group: int) -> Array | None:
    """The policy's per-slot logit bias ``extra["log_weight"] (B, Hkv, K)`` (RazorAttention's
    ``log |D|`` on its compensation token) at the slots ``idx (B, H, S)`` a step reads, or
    ``None`` without one; slots added since the policy ran get 0."""
    log_weight = c.extra.get("log_weight")
    if log_weight is None:
        return None
    grown = c.keys.shape[2] - log_weight.shape[-1]
    log_weight = np.pad(log_weight, [(0, 0), (0, 0), (0, grown)])  # (B, Hkv, C)
    per_head = np.repeat(log_weight, group, axis=1)  # (B, H, C)
    return np.take_along_axis(per_head, np.where(idx >= 0, idx, 0), axis=-1)  # (B, H, S)


def decode_step(
    weights: dec.DecoderWeights,
    cache: KVCache,
    token: Array,
    *,
    policy: KVPolicy | None = None,
    selector: KVSelector | None = None,
) -> tuple[Array, KVCache]:
    """Feed one token per row and return its next-token logits and the updated cache.

    Args:
        weights: the model.
        cache: the cache from :func:`prefill` or an earlier step.
        token: ids ``(B,)``.
        policy: compresses the cache after the step when its ``every_step`` is set.
        selector: chooses the cached keys each query head reads (``None``: all of them).

    Returns:
        ``logits (B, vocab)`` and the new cache.
    """
    _check_policy(policy, selector)
    config = weights.config
    token = dec.check_tokens(config, np.asarray(token).reshape(-1, 1), name="token")
    x = weights.embed[token]  # (B, 1, d)
    n = cache.n_tokens + 1
    layers = []
    for i, (lw, c) in enumerate(zip(weights.layers, cache.layers, strict=True)):
        if int(c.next_position.max()) >= config.max_len:
            raise ParameterError(
                f"token: expected a position below max_len={config.max_len} (RoPE is not "
                f"extrapolated), got position {int(c.next_position.max())} at layer {i}"
            )
        q, k, v = dec.project_qkv(config, lw, x, None)
        q = _rope_per_kv_head(q, c.next_position, config.group, config.rope_base)
        k = _rope_per_kv_head(k, c.next_position, 1, config.rope_base)
        c = _append(c, k, v, n - 1)
        view = _view(weights, c, n, q)
        idx = _selection(selector, i, view, config.n_heads, config.group)
        bias = _slot_bias(c, idx, config.group)
        attn = qkv.sparse_attention(q, c.keys, c.values, idx, bias=bias)  # (B, H, 1, Dh)
        x = dec.finish_block(config, lw, x, attn)
        if policy is not None and policy.every_step:
            c = _compress(weights, policy, i, c, n, q)
        layers.append(c)
    return dec.logits_of(weights, x)[:, 0], KVCache(tuple(layers), n)


def generate(
    weights: dec.DecoderWeights,
    prompt: Array,
    n_new: int,
    *,
    policy: KVPolicy | None = None,
    selector: KVSelector | None = None,
) -> Generation:
    """Prefill ``prompt`` and decode ``n_new`` tokens greedily.

    Args:
        weights: the model.
        prompt: token ids ``(B, N)`` or ``(N,)``.
        n_new: tokens to generate (``>= 1``).
        policy: the KV-cache policy (``None``: full cache).
        selector: the decode-time selection (``None``: read the whole cache).

    Returns:
        The :class:`Generation`.
    """
    if isinstance(n_new, bool) or not isinstance(n_new, int | np.integer) or n_new < 1:
        raise ParameterError(f"n_new: expected an integer >= 1, got {n_new!r}")
    t0 = time.perf_counter()
    logits, cache = prefill(weights, prompt, policy=policy)
    prefill_seconds = time.perf_counter() - t0
    step_logits = [logits[:, -1]]  # (B, vocab) each
    times = []
    for _ in range(n_new - 1):
        t0 = time.perf_counter()
        nxt, cache = decode_step(
            weights, cache, step_logits[-1].argmax(-1), policy=policy, selector=selector
        )
        times.append(time.perf_counter() - t0)
        step_logits.append(nxt)
    all_logits = np.stack(step_logits, axis=1)  # (B, n_new, vocab)
    return Generation(all_logits.argmax(-1), all_logits, cache, prefill_seconds, times)
