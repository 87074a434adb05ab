"""MQSA-TED (WSDM 2024): the two stacks, masks, window 1 = short model, and the TED loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.errors import ParameterError
from qkv.reference.recsys import mqsa
from qkv.reference.recsys.mqsa_ted import (
    MQSABlock,
    MQSAWeights,
    stack,
    ted_loss,
    transition_counts,
    window_mean,
)

V, D, N = 20, 8, 7


def make_block(rng):
    w = lambda *s: rng.standard_normal(s) / np.sqrt(D)  # noqa: E731
    ln = lambda: np.stack([1 + 0.1 * rng.standard_normal(D), 0.1 * rng.standard_normal(D)])  # noqa: E731
    return MQSABlock(w(D, D), w(D, D), w(D, D), ln(), ln(), w(D, D), w(D), w(D, D), w(D))


def make_weights(rng, shared=False):
    short = (make_block(rng), make_block(rng))
    long = short if shared else (make_block(rng), make_block(rng))
    ln = np.stack([np.ones(D), np.zeros(D)])
    return MQSAWeights(
        rng.standard_normal((V, D)) / np.sqrt(D),
        rng.standard_normal((N, D)) / 10,
        short,
        long,
        ln,
        ln,
    )


def torch_stack(e, valid, blocks, final_ln, heads, window):
    """The stack in torch with nn.MultiheadAttention-free explicit maths, one position at a time
    for the window mean."""
    x = torch.tensor(e) * torch.tensor(valid)[..., None]
    m = torch.tensor(valid, dtype=torch.float64)
    B, n, d = x.shape

    def ln(t, gb):
        return torch.nn.functional.layer_norm(
            t, (d,), torch.tensor(gb[0]), torch.tensor(gb[1]), 1e-8
        )

    for b in blocks:
        if window == 1:
            qi = x
        else:
            qi = torch.zeros_like(x)
            for t in range(n):
                lo = max(0, t - window + 1)
                cnt = m[:, lo : t + 1].sum(1, keepdim=True)
                qi[:, t] = (x[:, lo : t + 1] * m[:, lo : t + 1, None]).sum(1) / cnt.clamp(min=1)
        q_in = ln(qi, b.ln_q)
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool)) & torch.tensor(valid)[:, None, :]
        sh = lambda t: t.view(B, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        a = torch.nn.functional.scaled_dot_product_attention(
            sh(q_in @ torch.tensor(b.w_q)), sh(x @ torch.tensor(b.w_k)), sh(x @ torch.tensor(b.w_v)),
            attn_mask=allowed[:, None],
        )  # fmt: skip
        a = torch.nan_to_num(a).transpose(1, 2).reshape(B, n, d) * m[..., None]
        y = ln(q_in + a, b.ln_ffn)
        f = torch.relu(y @ torch.tensor(b.w1) + torch.tensor(b.b1)) @ torch.tensor(b.w2)
        x = (y + f + torch.tensor(b.b2)) * m[..., None]
    return ln(x, final_ln).numpy()


@pytest.mark.parametrize("window", [1, 2, 3, 7])
@pytest.mark.parametrize("heads", [1, 2])
def test_stack_matches_torch(window, heads):
    rng = np.random.default_rng(window + 10 * heads)
    w = make_weights(rng)
    e = rng.standard_normal((3, N, D))
    valid = np.ones((3, N), bool)
    valid[1, :3] = False  # left padding
    valid[2, :6] = False
    got = stack(e, valid, w.long, w.ln_long, heads=heads, window=window)
    want = torch_stack(e, valid, w.long, w.ln_long, heads, window)
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-9, atol=1e-9)


def test_window_one_and_alpha_one_are_the_short_query_model():
    rng = np.random.default_rng(0)
    seq = rng.integers(0, V, (2, N))
    w = make_weights(rng)
    short = mqsa(seq, w, alpha=1.0)
    D_ = w.items.shape[1]
    e = w.items[seq] * np.sqrt(D_) + w.positions[:N]
    h = stack(e, np.ones((2, N), bool), w.short, w.ln_short, heads=1, window=1)
    np.testing.assert_allclose(short, h @ w.items.T)
    shared = make_weights(rng, shared=True)
    for alpha in (0.0, 0.3, 1.0):  # window 1 with shared stacks: alpha does not matter
        np.testing.assert_allclose(
            mqsa(seq, shared, window=1, alpha=alpha), mqsa(seq, shared, alpha=1.0), atol=1e-12
        )
    assert not np.allclose(mqsa(seq, shared, window=3), mqsa(seq, shared, alpha=1.0))


def test_causal_and_padding():
    rng = np.random.default_rng(1)
    w = make_weights(rng)
    seq = rng.integers(0, V, (1, N))
    valid = np.array([[False, False] + [True] * (N - 2)])
    base = mqsa(seq, w, valid=valid, heads=2)
    later = seq.copy()
    later[0, 5:] = (later[0, 5:] + 1) % V
    np.testing.assert_allclose(mqsa(later, w, valid=valid, heads=2)[0, :5], base[0, :5], atol=1e-12)
    padded = seq.copy()
    padded[0, :2] = (padded[0, :2] + 3) % V
    np.testing.assert_allclose(
        mqsa(padded, w, valid=valid, heads=2)[0, 2:], base[0, 2:], atol=1e-12
    )


def test_window_mean_by_hand():
    x = np.arange(5.0)[None, :, None]
    valid = np.array([[False, True, True, True, True]])
    np.testing.assert_allclose(window_mean(x, valid, 3)[0, :, 0], [0, 1, 1.5, 2, 3])


def test_ted_loss_against_kl_and_a_loop():
    rng = np.random.default_rng(2)
    seqs = [rng.integers(0, V, 12) for _ in range(30)]
    counts = transition_counts(seqs, V)
    assert counts.sum() == 30 * 11 and counts[seqs[0][0], seqs[0][1]] >= 1
    items = rng.standard_normal((V, D))
    heads = np.arange(V)
    loss = ted_loss(items, heads, counts, temperature=0.1)
    total, entropy = 0.0, 0.0
    for i in heads:
        t = np.exp(counts[i] / counts[i].max() / 0.1)
        t /= t.sum()
        logits = items[i] @ items.T / 0.1
        p = np.exp(logits - logits.max())
        p /= p.sum()
        total += -(t * np.log(p)).sum() / V
        entropy += -(t * np.log(t)).sum() / V
    np.testing.assert_allclose(loss, total)
    # cross-entropy = entropy of the soft labels + KL(t || p) >= that entropy
    assert loss >= entropy


def test_bad_input():
    rng = np.random.default_rng(3)
    w = make_weights(rng)
    seq = rng.integers(0, V, (1, 4))
    with pytest.raises(ParameterError, match="window: expected at most the sequence length N = 4"):
        mqsa(seq, w, window=5)
    with pytest.raises(ParameterError, match="alpha"):
        mqsa(seq, w, alpha=1.5)
    with pytest.raises(ParameterError, match="temperature"):
        ted_loss(w.items, np.arange(3), np.ones((V, V)), temperature=0.0)
