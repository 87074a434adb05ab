"""In-context linear regression with one layer of multi-head softmax attention.

Independent checks: the prediction against a per-prompt loop, the hand-derived gradients against
central finite differences, the paper's zero-output property, the small-omega limit that turns
the structured model into the debiased GD predictor, ridge against ``numpy.linalg.lstsq`` on the
augmented system, and a short training run that must find the paper's patterns (loosely).
"""

from __future__ import annotations

import numpy as np
import pytest

from qkv.errors import ParameterError, ShapeError
from qkv.reference.forms import icl_attention as icl


def prompt(B=6, L=9, d=3, seed=0):
    task = icl.sample_tasks(B, L, d, rng=np.random.default_rng(seed))
    return task, *icl.tokens(task.x, task.y, task.x_q)


def test_tokens_layout():
    task, z, z_q = prompt()
    np.testing.assert_array_equal(z[..., :-1], task.x)
    np.testing.assert_array_equal(z[..., -1], task.y)
    np.testing.assert_array_equal(z_q, np.c_[task.x_q, np.zeros(len(task.x_q))])


def test_prediction_equals_a_loop_over_prompts_and_heads():
    _, z, z_q = prompt()
    p = icl.ICLParams.init(3, 3, std=0.7, rng=np.random.default_rng(1))
    y_hat, weights = icl.icl_regression(z, z_q, p.kq, p.ov, return_weights=True)
    for b in range(len(z)):
        Z = z[b].T  # (D, L): tokens as columns, as the paper writes them
        total = 0.0
        for h in range(3):
            s = Z.T @ p.kq[h] @ z_q[b]  # (L,)
            e = np.exp(s - s.max())
            total += p.ov[h] @ Z @ (e / e.sum())
            np.testing.assert_allclose(weights[b, h], e / e.sum(), atol=1e-14)
        assert y_hat[b] == pytest.approx(total, abs=1e-12)


def test_zero_sum_ov_with_equal_omega_predicts_zero():
    """The research note's property: equal softmax in every head, OV rows summing to 0."""
    _, z, z_q = prompt(L=30)
    p = icl.structured(np.full(4, 0.7), np.array([1.5, -0.5, 2.0, -3.0]), d=3)
    np.testing.assert_allclose(icl.icl_regression(z, z_q, p.kq, p.ov), 0.0, atol=1e-12)
    # More generally: equal KQ in every head and any OV rows that sum to zero.
    kq = np.repeat(np.random.default_rng(2).standard_normal((1, 4, 4)), 3, axis=0)
    ov = np.random.default_rng(3).standard_normal((3, 4))
    ov[-1] = -ov[:-1].sum(axis=0)
    np.testing.assert_allclose(icl.icl_regression(z, z_q, kq, ov), 0.0, atol=1e-12)


def test_small_omega_structured_model_is_debiased_gd():
    """softmax(w s) ~ (1 + w (s - mean s)) / L: the zero-sum pair gives eta = sum mu w."""
    task, z, z_q = prompt(B=50, L=200, d=4)
    omega, mu = 1e-4, 3.0
    p = icl.structured(np.array([omega, -omega]), np.array([mu, -mu]), d=4)
    y_hat = icl.icl_regression(z, z_q, p.kq, p.ov)
    gd = icl.debiased_gd(task.x, task.y, task.x_q, step=2 * omega * mu)
    np.testing.assert_allclose(y_hat, gd, rtol=1e-3, atol=1e-9)


def test_debiased_gd_equals_a_loop():
    task, _, _ = prompt()
    got = icl.debiased_gd(task.x, task.y, task.x_q, step=0.5)
    for b in range(len(task.x)):
        xbar = task.x[b].mean(axis=0)
        want = 0.5 * sum(
            yl * (xl - xbar) @ task.x_q[b] for xl, yl in zip(task.x[b], task.y[b], strict=True)
        )
        assert got[b] == pytest.approx(want / task.x.shape[1], abs=1e-12)


def test_ridge_equals_least_squares_on_the_augmented_system():
    task, _, _ = prompt(L=5, d=4)
    lam = 0.4
    got = icl.ridge(task.x, task.y, task.x_q, lam)
    for b in range(len(task.x)):
        A = np.vstack([task.x[b], np.sqrt(lam) * np.eye(4)])
        beta = np.linalg.lstsq(A, np.r_[task.y[b], np.zeros(4)], rcond=None)[0]
        assert got[b] == pytest.approx(beta @ task.x_q[b], abs=1e-10)


def test_gradients_match_finite_differences():
    task, z, z_q = prompt(B=5, L=7, d=2, seed=4)
    p = icl.ICLParams.init(2, 2, std=0.8, rng=np.random.default_rng(5))
    _, grads = icl.loss_and_grads(z, z_q, task.y_q, p)
    h = 1e-6
    rng = np.random.default_rng(6)
    for name in ("kq", "ov"):
        w = getattr(p, name)
        for _ in range(8):
            index = tuple(rng.integers(0, n) for n in w.shape)
            if name == "kq" and index[-1] == 2:
                continue  # the column that meets z_q's zero: its derivative is exactly 0
            up, down = w.copy(), w.copy()
            up[index] += h
            down[index] -= h
            other = p.ov if name == "kq" else p.kq
            pair = (up, other) if name == "kq" else (other, up)
            pair_down = (down, other) if name == "kq" else (other, down)
            plus = icl.loss_and_grads(z, z_q, task.y_q, icl.ICLParams(*pair))[0]
            minus = icl.loss_and_grads(z, z_q, task.y_q, icl.ICLParams(*pair_down))[0]
            numeric = (plus - minus) / (2 * h)
            assert getattr(grads, name)[index] == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    np.testing.assert_array_equal(grads.kq[..., -1], 0.0)


def test_structured_weights_score_zero():
    scores = icl.pattern_scores(icl.structured(np.array([0.3, -0.3]), np.array([1.0, -1.0]), 5))
    assert scores["kq_off_pattern"] == scores["ov_off_last"] == scores["ov_sum"] == 0.0
    np.testing.assert_array_equal(scores["omega"], [0.3, -0.3])


def test_short_training_finds_the_patterns():
    """Seconds of Adam from random weights: loss down, KQ diagonal-homogeneous, OV last entry
    and zero sum (loose bounds; the tutorial trains longer)."""
    run = icl.train(steps=300, batch=128, lr=0.03, seed=0)
    start = icl.pattern_scores(icl.ICLParams.init(4, 5, rng=np.random.default_rng(0)))
    end = icl.pattern_scores(run.params)
    assert run.losses.shape == (300,)
    assert run.losses[-50:].mean() < 0.6 * run.losses[:20].mean()
    assert start["kq_off_pattern"] > 0.8 and end["kq_off_pattern"] < 0.5
    assert start["ov_off_last"] > 0.5 and end["ov_off_last"] < 0.3
    assert end["ov_sum"] < 0.2
    assert (end["omega"] > 0.1).any() and (end["omega"] < -0.1).any()  # paired signs


def test_training_is_deterministic():
    a = icl.train(steps=20, batch=16, seed=3)
    b = icl.train(steps=20, batch=16, seed=3)
    np.testing.assert_array_equal(a.params.kq, b.params.kq)
    np.testing.assert_array_equal(a.losses, b.losses)


# --------------------------------------------------------------------------- bad input


def test_bad_shapes_name_the_argument():
    task, z, z_q = prompt(d=3)
    p = icl.ICLParams.init(2, 3, rng=np.random.default_rng(0))
    with pytest.raises(ShapeError, match="z_q"):
        icl.icl_regression(z, z_q[:, :-1], p.kq, p.ov)
    with pytest.raises(ShapeError, match="kq"):
        icl.icl_regression(z, z_q, p.kq[:, :-1], p.ov)
    with pytest.raises(ShapeError, match="ov"):
        icl.icl_regression(z, z_q, p.kq, p.ov[:1])
    with pytest.raises(ShapeError, match="z:"):
        icl.icl_regression(z[0], z_q, p.kq, p.ov)
    with pytest.raises(ShapeError, match="y:"):
        icl.tokens(task.x, task.y[:, :-1], task.x_q)
    with pytest.raises(ShapeError, match="x_q"):
        icl.debiased_gd(task.x, task.y, task.x_q[:, :-1])
    with pytest.raises(ShapeError, match="omega, mu"):
        icl.structured(np.ones(2), np.ones(3), 3)


def test_bad_parameters():
    task, _, _ = prompt()
    with pytest.raises(ParameterError, match="lam"):
        icl.ridge(task.x, task.y, task.x_q, -1.0)
    with pytest.raises(ParameterError, match="noise"):
        icl.sample_tasks(2, 3, 4, noise=-0.1, rng=np.random.default_rng(0))
    with pytest.raises(ParameterError, match="context"):
        icl.sample_tasks(2, 0, 4, rng=np.random.default_rng(0))
    with pytest.raises(ParameterError, match="lr"):
        icl.train(steps=1, lr=0.0)
