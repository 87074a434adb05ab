r"""Circuit analysis of the lab decoder: direct logit attribution, activation patching and
low-rank query/key/value subspaces of a head.

Paper: *Does Circuit Analysis Interpretability Scale? Evidence from Multiple Choice Capabilities
in Chinchilla* (Lieberum, Rahtz, Kramár, Nanda, Irving, Shah, Mikulik, arXiv 2307.09458). No
official code was released; everything here follows the paper's text, on the lab decoder
(:mod:`qkv.lab.decoder`).

**Direct logit attribution.** The final residual stream of a pre-norm decoder is a sum of what
every component wrote into it: the token embedding, every head (through its slice of $W_O$)
and every MLP,

$$
x_L = e + \sum_{\ell, h} o^{(\ell, h)} W_O^{(\ell, h)} + \sum_\ell m^{(\ell)} .
$$

The logits are $\operatorname{RMSNorm}(x_L) E^\top = (x_L / s) \odot g\, E^\top$ with
$s = \sqrt{\operatorname{mean}(x_L^2) + \epsilon}$. As in the paper, the norm's scale $s$ is
*frozen* at its value on the run being analysed, which makes the map from the residual stream to
the logits linear, so each component gets a direct effect on the logit (difference)
$u = E_{\text{target}} - E_{\text{foil}}$,

$$
\operatorname{DLA}(c) = \frac{(c \odot g) \cdot u}{s},
$$

and the direct effects of all heads, all MLPs and the embedding add up to the model's logit
(difference) exactly.

**Activation patching.** Run a *corrupted* prompt (here: another passkey in the same filler),
but overwrite the output of one head with its output on the *clean* prompt; the restored fraction
of the logit difference $\Delta = \text{logit}_{\text{target}} - \text{logit}_{\text{foil}}$ is

$$
r_{\ell h} = \frac{\Delta_{\text{patched}} - \Delta_{\text{corrupted}}}
                  {\Delta_{\text{clean}} - \Delta_{\text{corrupted}}} .
$$

Patching every head of every layer from clean into corrupted restores the clean final position
exactly when the two prompts share their last token: by induction over the layers, that
position's residual stream (embedding, then clean head outputs, then MLPs of equal inputs) is the
clean one, so $r = 1$.

**Low-rank subspaces.** The paper compresses the query, key and value of a head by projecting
them onto the top singular directions of their activations on the task. With $Q \in
\mathbb R^{n \times D_h}$ the head's (rotated) queries over a calibration set and $Q = U \Sigma
V^\top$ (uncentred SVD), the rank-$r$ query is $q V_{:r} V_{:r}^\top$; likewise keys (the QK
side: the attention pattern) and values (the OV side: what the head writes). Rank $D_h$ leaves
the head unchanged; value rank 0 zeroes its output; query/key rank 0 makes its attention uniform.
Queries and keys are taken after RoPE, the form in which they meet. With grouped heads the keys
and values of the compressed head are projected for that head alone; the other heads of its
group read the original ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

import qkv
from qkv.errors import DTypeError, ParameterError, ShapeError
from qkv.lab import decoder as dec
from qkv.lab.tasks import Example
from qkv.reference.analysis.retrieval_score import (
    check_heads,
    check_threshold,
    ranked,
    stack_examples,
)

Array = np.ndarray
Head = tuple[int, int]


# ----------------------------------------------------------------------------- input checks


def check_prompt(config: dec.DecoderConfig, tokens: Array, name: str = "tokens") -> Array:
    """``tokens`` as int64 ``(B, N)``; a non-integer dtype is a :class:`DTypeError`."""
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DTypeError(f"{name}: expected integer token ids, got dtype {tokens.dtype}")
    return dec.check_tokens(config, tokens, name=name)


def check_token_ids(config: dec.DecoderConfig, ids: int | Array, batch: int, name: str) -> Array:
    """``ids`` (one id, or one per prompt) as int64 ``(batch,)`` inside the vocabulary."""
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer) or arr.shape not in ((), (batch,)):
        raise ParameterError(
            f"{name}: expected a token id or {batch} of them, got {arr.dtype} {arr.shape}"
        )
    if arr.min() < 0 or arr.max() >= config.vocab:
        raise ParameterError(f"{name}: expected token ids in [0, {config.vocab}), got {ids!r}")
    return np.broadcast_to(arr.astype(np.int64), (batch,))


def check_position(position: int, n: int) -> int:
    """``position`` as a non-negative index into ``n`` positions (negative counts from the end)."""
    if not isinstance(position, int | np.integer) or not -n <= int(position) < n:
        raise ParameterError(f"position: expected an int in [-{n}, {n}), got {position!r}")
    return int(position) % n


def check_head(config: dec.DecoderConfig, head: Head) -> Head:
    """One ``(layer, head)`` pair inside the model."""
    return check_heads(config, [head])[0]


# ----------------------------------------------------------------------------- the decomposition


@dataclass(frozen=True, eq=False)
class Trace:
    """Every component's contribution to the residual stream of one forward pass.

    Attributes:
        embed: token embeddings ``(B, N, d)``.
        q: rotated queries of every layer ``(L, B, H, N, Dh)``.
        k: rotated keys ``(L, B, Hkv, N, Dh)``.
        v: values ``(L, B, Hkv, N, Dh)``.
        attn: per-head attention outputs, before ``W_O`` ``(L, B, H, N, Dh)``.
        mlp: MLP outputs ``(L, B, N, d)``.
        final: the last residual stream ``(B, N, d)``.
    """

    embed: Array
    q: Array
    k: Array
    v: Array
    attn: Array
    mlp: Array
    final: Array


def trace(
    weights: dec.DecoderWeights, tokens: Array, *, attention: dec.AttentionFn | None = None
) -> Trace:
    """Run the decoder and keep every component's output.

    Args:
        weights: the lab decoder.
        tokens: token ids ``(B, N)`` or ``(N,)``.
        attention: replaces the causal attention (see :func:`qkv.lab.decoder.forward`).

    Returns:
        The :class:`Trace`; ``logits_of(weights, trace.final)`` equals the model's logits.
    """
    config = weights.config
    tokens = check_prompt(config, tokens)
    x = weights.embed[tokens]  # (B, N, d)
    embed = x
    qs, ks, vs, attns, mlps = [], [], [], [], []
    for i, layer in enumerate(weights.layers):
        q, k, v = dec.project_qkv(config, layer, x, 0)
        out = (attention or dec.causal_attention)(i, q, k, v)  # (B, H, N, Dh)
        h = x + dec.merge_heads(out) @ layer.wo  # (B, N, d)
        x = dec.finish_block(config, layer, x, out)  # (B, N, d)
        qs.append(q)
        ks.append(k)
        vs.append(v)
        attns.append(out)
        mlps.append(x - h)
    return Trace(embed, *(np.stack(a) for a in (qs, ks, vs, attns, mlps)), final=x)


def head_outputs(weights: dec.DecoderWeights, tr: Trace) -> Array:
    r"""What each head writes into the residual stream, $o^{(\ell,h)} W_O^{(\ell,h)}$:
    ``(L, B, H, N, d)``."""
    config = weights.config
    L, B, H, N, Dh = tr.attn.shape
    wo = np.stack([layer.wo for layer in weights.layers])  # (L, H * Dh, d)
    wo = wo.reshape(L, H, Dh, config.d_model)  # (L, H, Dh, d)
    return np.einsum("lbhnk,lhkd->lbhnd", tr.attn, wo)


@dataclass(frozen=True, eq=False)
class LogitAttribution:
    """Direct logit attribution at one position (see the module docstring).

    Attributes:
        heads: direct effect of every head ``(B, L, H)``.
        mlps: direct effect of every MLP ``(B, L)``.
        embed: direct effect of the token embedding ``(B,)``.
        logit: the model's logit (difference) ``(B,)``; equals the sum of all the above.
        scale: the frozen RMSNorm scale ``s`` ``(B,)``.
    """

    heads: Array
    mlps: Array
    embed: Array
    logit: Array
    scale: Array

    def total(self) -> Array:
        """Sum of every direct effect ``(B,)`` (equals ``logit``)."""
        return self.heads.sum((1, 2)) + self.mlps.sum(1) + self.embed

    def top(self, k: int) -> tuple[Head, ...]:
        """The ``k`` heads with the largest batch-mean direct effect, largest first."""
        return ranked(self.heads.mean(0))[:k]


def circuits(
    weights: dec.DecoderWeights,
    tokens: Array,
    target: int | Array,
    *,
    foil: int | Array | None = None,
    position: int = -1,
) -> LogitAttribution:
    r"""Direct logit attribution of every head, MLP and the embedding (frozen norm scale).

    Args:
        weights: the lab decoder.
        tokens: token ids ``(B, N)`` or ``(N,)``.
        target: the token whose logit is attributed, one for all prompts or one per prompt
            ``(B,)``.
        foil: if given (like ``target``), the logit difference ``target - foil`` is attributed.
        position: the position whose next-token logits are read (default: the last).

    Returns:
        The :class:`LogitAttribution`.
    """
    config = weights.config
    tokens = check_prompt(config, tokens)
    p = check_position(position, tokens.shape[1])
    B = tokens.shape[0]
    target = check_token_ids(config, target, B, "target")
    u = weights.embed[target]  # (B, d)
    if foil is not None:
        foil = check_token_ids(config, foil, B, "foil")
        u = u - weights.embed[foil]  # (B, d)
    tr = trace(weights, tokens)
    final = tr.final[:, p]  # (B, d)
    scale = np.sqrt(np.mean(final * final, axis=-1) + config.eps)  # (B,)
    readout = weights.final_norm * u / scale[:, None]  # (B, d): g * u / s
    heads = np.einsum("lbhd,bd->lbh", head_outputs(weights, tr)[:, :, :, p], readout)  # (L, B, H)
    mlps = np.einsum("lbd,bd->lb", tr.mlp[:, :, p], readout)  # (L, B)
    embed = np.einsum("bd,bd->b", tr.embed[:, p], readout)  # (B,)
    logits = dec.logits_of(weights, final)  # (B, vocab)
    rows = np.arange(B)
    logit = logits[rows, target] - (logits[rows, foil] if foil is not None else 0.0)  # (B,)
    return LogitAttribution(heads.transpose(1, 0, 2), mlps.T, embed, logit, scale)


# ----------------------------------------------------------------------------- patching


def patch_heads(clean: Trace, heads: Sequence[Head]) -> dec.AttentionFn:
    """An attention whose listed heads output what they output on the ``clean`` run."""
    by_layer: dict[int, set[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, set()).add(head)
    return dec.replace_heads(by_layer, lambda layer, q, k, v: clean.attn[layer])


@dataclass(frozen=True, eq=False)
class Patching:
    """What :func:`activation_patching` measured.

    Attributes:
        restored: restored fraction of the logit difference for every patched head ``(L, H)``
            (NaN for heads that were not patched).
        clean: batch-mean logit difference on the clean prompts.
        corrupted: batch-mean logit difference on the corrupted prompts.
    """

    restored: Array
    clean: float
    corrupted: float

    def heads(self, threshold: float = 0.1) -> tuple[Head, ...]:
        """Heads that restore more than ``threshold`` of the logit difference, best first."""
        threshold = check_threshold(threshold)
        scores = np.nan_to_num(self.restored, nan=-np.inf)
        return tuple(h for h in ranked(scores) if scores[h] > threshold)


def logit_difference(logits: Array, target: Array, foil: Array, position: int) -> float:
    """Batch mean of ``logits[b, position, target[b]] - logits[b, position, foil[b]]``."""
    rows = np.arange(logits.shape[0])
    return float(np.mean(logits[rows, position, target] - logits[rows, position, foil]))


def activation_patching(
    weights: dec.DecoderWeights,
    clean: Array,
    corrupted: Array,
    target: int | Array,
    foil: int | Array,
    *,
    heads: Sequence[Head] | None = None,
    together: bool = False,
    position: int = -1,
) -> Patching:
    """Patch each head's output (every position) from the clean into the corrupted run.

    Args:
        weights: the lab decoder.
        clean: clean prompts ``(B, N)`` or ``(N,)``.
        corrupted: corrupted prompts, the same shape as ``clean``.
        target: the clean answer token, one for all prompts or one per prompt ``(B,)``.
        foil: the corrupted answer token (like ``target``).
        heads: the heads to patch (default: all).
        together: patch all ``heads`` in one run (their restored fraction is stored for each of
            them) instead of one run per head.
        position: the position whose logits are read (default: the last).

    Returns:
        The :class:`Patching` result.

    Raises:
        ShapeError: ``clean`` and ``corrupted`` differ in shape.
        ParameterError: the clean and corrupted logit differences are equal (nothing to restore).
    """
    config = weights.config
    clean = check_prompt(config, clean, "clean")
    corrupted = check_prompt(config, corrupted, "corrupted")
    if clean.shape != corrupted.shape:
        raise ShapeError(
            f"corrupted: expected the shape of clean {clean.shape}, got {corrupted.shape}"
        )
    p = check_position(position, clean.shape[1])
    target = check_token_ids(config, target, clean.shape[0], "target")
    foil = check_token_ids(config, foil, clean.shape[0], "foil")
    L, H = config.n_layers, config.n_heads
    chosen = check_heads(
        config, [(i, j) for i in range(L) for j in range(H)] if heads is None else heads
    )
    clean_trace = trace(weights, clean)
    clean_diff = logit_difference(dec.logits_of(weights, clean_trace.final), target, foil, p)
    corrupt_diff = logit_difference(dec.forward(weights, corrupted), target, foil, p)
    gap = clean_diff - corrupt_diff
    if abs(gap) <= 1e-6 * max(abs(clean_diff), 1.0):
        raise ParameterError(
            f"corrupted: expected a logit difference other than the clean one ({clean_diff:.4g}), "
            f"got {corrupt_diff:.4g}; nothing to restore"
        )
    restored = np.full((L, H), np.nan)
    groups = [chosen] if together else [[h] for h in chosen]
    for group in groups:
        logits = dec.forward(weights, corrupted, attention=patch_heads(clean_trace, group))
        fraction = (logit_difference(logits, target, foil, p) - corrupt_diff) / gap
        for head in group:
            restored[head] = fraction
    return Patching(restored, clean_diff, corrupt_diff)


# ----------------------------------------------------------------------------- low rank


@dataclass(frozen=True, eq=False)
class HeadSubspaces:
    """Orthonormal bases of one head's query, key and value activations, best direction first.

    Attributes:
        head: the ``(layer, head)`` they belong to.
        q: query basis, one direction per column ``(Dh, Dh)``.
        k: key basis ``(Dh, Dh)``.
        v: value basis ``(Dh, Dh)``.
        singular: singular values of the query, key and value activations ``(3, Dh)``.
    """

    head: Head
    q: Array
    k: Array
    v: Array
    singular: Array


def _basis(x: Array) -> tuple[Array, Array]:
    """Right singular vectors ``(Dh, Dh)`` (columns) and singular values ``(Dh,)`` of ``x (n, Dh)``."""
    _, s, vt = np.linalg.svd(x, full_matrices=True)
    values = np.zeros(x.shape[1], dtype=s.dtype)
    values[: len(s)] = s
    return vt.T, values


def head_subspaces(weights: dec.DecoderWeights, tokens: Array, head: Head) -> HeadSubspaces:
    """The uncentred SVD bases of ``head``'s rotated queries, rotated keys and values.

    Args:
        weights: the lab decoder.
        tokens: calibration prompts ``(B, N)`` or ``(N,)`` (every position is used).
        head: ``(layer, query head)``; its key/value head is ``head // group``.

    Returns:
        The :class:`HeadSubspaces`.
    """
    config = weights.config
    layer, h = check_head(config, head)
    tr = trace(weights, tokens)
    g = h // config.group
    Dh = config.head_dim
    parts = [tr.q[layer, :, h], tr.k[layer, :, g], tr.v[layer, :, g]]  # each (B, N, Dh)
    bases = [_basis(a.reshape(-1, Dh)) for a in parts]  # (B * N, Dh) each
    return HeadSubspaces(
        (layer, h), *(b for b, _ in bases), singular=np.stack([s for _, s in bases])
    )


def check_rank(rank: int, head_dim: int, name: str) -> int:
    """``rank`` as an int in ``[0, head_dim]``."""
    if not isinstance(rank, int | np.integer) or not 0 <= int(rank) <= head_dim:
        raise ParameterError(
            f"{name}: expected an int in [0, {head_dim}] (the head dim), got {rank!r}"
        )
    return int(rank)


def qk_ov_lowrank(
    weights: dec.DecoderWeights,
    subspaces: HeadSubspaces | Sequence[HeadSubspaces],
    *,
    qk_rank: int,
    ov_rank: int,
) -> dec.AttentionFn:
    r"""An attention in which the given heads read rank-limited queries, keys and values.

    Each head's queries and keys are projected onto the first ``qk_rank`` directions of their
    bases, its values onto the first ``ov_rank`` of theirs: $q \mapsto q V_{:r} V_{:r}^\top$.

    Args:
        weights: the lab decoder.
        subspaces: the bases of one head or of several (:func:`head_subspaces`).
        qk_rank: rank kept for queries and keys, in ``[0, Dh]``.
        ov_rank: rank kept for values, in ``[0, Dh]``.

    Returns:
        An :data:`qkv.lab.decoder.AttentionFn` for :func:`qkv.lab.decoder.forward`.
    """
    config = weights.config
    qk_rank = check_rank(qk_rank, config.head_dim, "qk_rank")
    ov_rank = check_rank(ov_rank, config.head_dim, "ov_rank")
    chosen = [subspaces] if isinstance(subspaces, HeadSubspaces) else list(subspaces)
    check_heads(config, [sub.head for sub in chosen])

    def project(x: Array, basis: Array, r: int) -> Array:
        return x @ basis[:, :r] @ basis[:, :r].T  # (B, N, Dh)

    def attention(i: int, q: Array, k: Array, v: Array) -> Array:
        out = dec.causal_attention(i, q, k, v)  # (B, H, N, Dh)
        here = [sub for sub in chosen if sub.head[0] == i]
        if here:
            out = out.copy()
        for sub in here:
            h = sub.head[1]
            g = h // config.group
            qh = project(q[:, h], sub.q, qk_rank)[:, None]  # (B, 1, N, Dh)
            kh = project(k[:, g], sub.k, qk_rank)[:, None]  # (B, 1, N, Dh)
            vh = project(v[:, g], sub.v, ov_rank)[:, None]  # (B, 1, N, Dh)
            out[:, h] = qkv.sdpa(qh, kh, vh, causal=True)[:, 0]
        return out

    return attention


def lowrank_accuracy(
    weights: dec.DecoderWeights,
    examples: Sequence[Example],
    subspaces: HeadSubspaces | Sequence[HeadSubspaces],
    ranks: Sequence[int],
    *,
    side: str = "both",
) -> Array:
    """Answer accuracy with the given heads compressed to each rank (teacher forced).

    Every answer token is predicted from the true prompt and answer prefix (one forward per
    rank over ``prompt + answer[:-1]``), so an early mistake does not decide the later tokens.

    Args:
        weights: the lab decoder.
        examples: needle tests of one length (:func:`qkv.lab.tasks.passkey`).
        subspaces: the bases of the heads to compress.
        ranks: the ranks to try, each in ``[0, Dh]``.
        side: ``"qk"`` (queries and keys), ``"ov"`` (values) or ``"both"``; the other side keeps
            full rank.

    Returns:
        Accuracy at each rank ``(len(ranks),)``: fraction of answer tokens predicted right.
    """
    if side not in ("qk", "ov", "both"):
        raise ParameterError(f"side: expected 'qk', 'ov' or 'both', got {side!r}")
    prompts, answers = stack_examples(examples)  # (B, P), (B, T)
    P = prompts.shape[1]
    tokens = np.concatenate([prompts, answers[:, :-1]], axis=1)  # (B, P + T - 1)
    full = weights.config.head_dim
    accuracy = []
    for r in ranks:
        qk_rank = r if side in ("qk", "both") else full
        ov_rank = r if side in ("ov", "both") else full
        fn = qk_ov_lowrank(weights, subspaces, qk_rank=qk_rank, ov_rank=ov_rank)
        logits = dec.forward(weights, tokens, attention=fn)[:, P - 1 :]  # (B, T, V)
        accuracy.append(float((logits.argmax(-1) == answers).mean()))
    return np.array(accuracy)
