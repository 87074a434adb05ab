"""CODA-Prompt (arXiv 2211.13218): cosine-weighted components, orthogonality, prefix-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.errors import ParameterError, ShapeError
from qkv.reference.recsys import coda_prompt
from qkv.reference.recsys.coda_prompting import PromptPool, orthogonality_penalty, prefix_attention


def make_pool(rng, M=6, Lp=4, D=8):
    return PromptPool(
        rng.standard_normal((M, Lp, D)), rng.standard_normal((M, D)), rng.standard_normal((M, D))
    )


def test_prompt_matches_torch_cosine_similarity():
    rng = np.random.default_rng(0)
    pool = make_pool(rng)
    x = rng.standard_normal((3, 8))
    p, alpha = coda_prompt(x, pool, return_weights=True)
    tx, tk, ta = (torch.tensor(a) for a in (x, pool.keys, pool.attention))
    want_alpha = torch.nn.functional.cosine_similarity(tx[:, None] * ta[None], tk[None], dim=-1)
    np.testing.assert_allclose(alpha, want_alpha.numpy(), rtol=1e-12)
    want_p = sum(want_alpha[:, m, None, None].numpy() * pool.components[m] for m in range(6))
    np.testing.assert_allclose(p, want_p, rtol=1e-12)


def test_weights_are_cosines_invariant_to_query_scale_and_only_active_components_count():
    rng = np.random.default_rng(1)
    pool = make_pool(rng)
    x = rng.standard_normal((2, 8))
    p, alpha = coda_prompt(x, pool, return_weights=True)
    assert (np.abs(alpha) <= 1 + 1e-12).all()
    np.testing.assert_allclose(coda_prompt(7.5 * x, pool), p)
    p3, a3 = coda_prompt(x, pool, n_active=3, return_weights=True)
    np.testing.assert_allclose(a3, alpha[:, :3])
    changed = PromptPool(pool.components.copy(), pool.keys, pool.attention)
    changed.components[3:] = 0  # later tasks' components do not reach an n_active = 3 prompt
    np.testing.assert_allclose(coda_prompt(x, changed, n_active=3), p3)


def test_orthogonality_penalty():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((12, 5)))
    assert orthogonality_penalty(q.T.reshape(5, 3, 4)) < 1e-28
    t = rng.standard_normal((5, 12))
    want = np.mean([(t[i] @ t[j] - (i == j)) ** 2 for i in range(5) for j in range(5)])
    np.testing.assert_allclose(orthogonality_penalty(t), want)


def test_prefix_attention_matches_explicit_concatenation_in_torch():
    rng = np.random.default_rng(3)
    B, N, D, H, Lp = 2, 5, 8, 2, 6
    x = rng.standard_normal((B, N, D))
    prompt = rng.standard_normal((B, Lp, D))
    w = [rng.standard_normal((D, D)) / np.sqrt(D) for _ in range(3)]
    got = prefix_attention(x, prompt, *w, heads=H)
    tx, tp = torch.tensor(x), torch.tensor(prompt)
    q = tx @ torch.tensor(w[0])
    k = torch.cat([tp[:, : Lp // 2], tx @ torch.tensor(w[1])], dim=1)
    v = torch.cat([tp[:, Lp // 2 :], tx @ torch.tensor(w[2])], dim=1)
    heads = lambda t: t.view(B, -1, H, D // H).transpose(1, 2)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    np.testing.assert_allclose(got, want.transpose(1, 2).reshape(B, N, D).numpy(), rtol=1e-10)
    empty = prefix_attention(x, None, *w, heads=H)  # no prompt: plain attention
    plain = torch.nn.functional.scaled_dot_product_attention(
        heads(q), heads(tx @ torch.tensor(w[1])), heads(tx @ torch.tensor(w[2]))
    )
    np.testing.assert_allclose(empty, plain.transpose(1, 2).reshape(B, N, D).numpy(), rtol=1e-10)


def test_bad_input():
    rng = np.random.default_rng(4)
    pool = make_pool(rng)
    with pytest.raises(ShapeError, match="x: expected feature dim D = 8"):
        coda_prompt(rng.standard_normal((2, 7)), pool)
    with pytest.raises(ShapeError, match="keys: expected"):
        coda_prompt(
            rng.standard_normal((2, 8)), PromptPool(pool.components, pool.keys[:3], pool.attention)
        )
    with pytest.raises(ParameterError, match="n_active: expected at most M = 6"):
        coda_prompt(rng.standard_normal((2, 8)), pool, n_active=7)
    w = np.eye(8)
    with pytest.raises(ShapeError, match="even length"):
        prefix_attention(
            rng.standard_normal((1, 3, 8)), rng.standard_normal((1, 3, 8)), w, w, w, heads=2
        )
