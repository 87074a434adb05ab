"""MiniLM self-attention distillation (arXiv 2002.10957) and Margin-MSE (arXiv 2010.02666)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.errors import DTypeError, ShapeError
from qkv.reference.analysis import margin_mse, minilm_distill
from qkv.reference.analysis.margin_mse_loss import margin_mse_grad
from qkv.reference.analysis.minilm_distillation import minilm_distill_grad


def triple(rng, B, H, N, d, scale=1.0):
    return tuple(scale * rng.standard_normal((B, H, N, d)) for _ in range(3))


def torch_minilm(teacher, student, valid):
    """The two losses in torch, written from the paper's sums with torch's KL."""

    def rel(a, b, d):
        s = a @ b.transpose(-1, -2) / np.sqrt(d)
        s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
        return torch.log_softmax(s, dim=-1)

    total = []
    for pick in ((0, 1), (2, 2)):
        lt = rel(teacher[pick[0]], teacher[pick[1]], teacher[0].shape[-1])
        ls = rel(student[pick[0]], student[pick[1]], student[0].shape[-1])
        kl = torch.where(lt.isfinite(), lt.exp() * (lt - ls), torch.zeros_like(lt)).sum(-1)
        per_seq = (kl * valid[:, None]).sum((1, 2)) / (kl.shape[1] * valid.sum(1))
        total.append(per_seq.mean())
    return total


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(2, 7), seed=st.integers(0, 2**31))
def test_losses_and_gradients_match_torch_autograd(B, H, N, seed):
    rng = np.random.default_rng(seed)
    teacher, student = triple(rng, B, H, N, 6), triple(rng, B, H, N, 3)
    valid = rng.random((B, N)) < 0.8
    valid[:, 0] = True
    at, vr = minilm_distill(teacher, student, valid=valid, return_parts=True)
    ts = [torch.tensor(x, requires_grad=True) for x in student]
    t_at, t_vr = torch_minilm([torch.tensor(x) for x in teacher], ts, torch.tensor(valid))
    np.testing.assert_allclose([at, vr], [t_at.item(), t_vr.item()], rtol=1e-10, atol=1e-13)
    (t_at + t_vr).backward()
    grads = minilm_distill_grad(teacher, student, valid=valid)
    for g, t in zip(grads, ts, strict=True):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_gradient_matches_central_finite_differences():
    rng = np.random.default_rng(0)
    teacher, student = triple(rng, 1, 2, 5, 4), triple(rng, 1, 2, 5, 4)
    grads = minilm_distill_grad(teacher, student)
    h = 1e-6
    for which in range(3):
        for idx in [(0, 0, 0, 0), (0, 1, 3, 2), (0, 1, 4, 3)]:
            plus = [x.copy() for x in student]
            minus = [x.copy() for x in student]
            plus[which][idx] += h
            minus[which][idx] -= h
            fd = (minilm_distill(teacher, plus) - minilm_distill(teacher, minus)) / (2 * h)
            np.testing.assert_allclose(grads[which][idx], fd, rtol=1e-6, atol=1e-9)


def test_zero_when_the_student_matches_and_positive_otherwise():
    rng = np.random.default_rng(1)
    teacher = triple(rng, 2, 4, 6, 8)
    assert minilm_distill(teacher, teacher) == pytest.approx(0.0, abs=1e-15)
    # a narrower student with the same relations: q, k, v on a 4-dim subspace, rescaled so that
    # q k^T / sqrt(d) and v v^T / sqrt(d) match a teacher built the same way
    base = triple(rng, 2, 4, 6, 4)
    wide = tuple(np.concatenate([x, np.zeros_like(x)], axis=-1) * 2**0.25 for x in base)
    assert minilm_distill(wide, base) == pytest.approx(0.0, abs=1e-12)
    assert minilm_distill(teacher, triple(rng, 2, 4, 6, 3)) > 0


def test_bad_input_minilm():
    rng = np.random.default_rng(2)
    with pytest.raises(ShapeError, match="teacher's head count H = 12"):
        minilm_distill(triple(rng, 1, 12, 5, 4), triple(rng, 1, 6, 5, 4))
    with pytest.raises(ShapeError, match=r"\(B, N\)"):
        minilm_distill(triple(rng, 1, 2, 5, 4), triple(rng, 1, 2, 4, 4))
    with pytest.raises(ShapeError, match="one shape"):
        q, k, v = triple(rng, 1, 2, 5, 4)
        minilm_distill((q, k, v[..., :3]), triple(rng, 1, 2, 5, 4))


# --------------------------------------------------------------------------- Margin-MSE


def test_margin_mse_against_a_loop_and_its_gradient():
    rng = np.random.default_rng(3)
    sp, sn, tp, tn = rng.standard_normal((4, 9))
    want = sum(((sp[i] - sn[i]) - (tp[i] - tn[i])) ** 2 for i in range(9)) / 9
    np.testing.assert_allclose(margin_mse(sp, sn, tp, tn), want)
    sp_t, sn_t = torch.tensor(sp, requires_grad=True), torch.tensor(sn, requires_grad=True)
    torch.nn.functional.mse_loss(sp_t - sn_t, torch.tensor(tp - tn)).backward()
    d_pos, d_neg = margin_mse_grad(sp, sn, tp, tn)
    np.testing.assert_allclose(d_pos, sp_t.grad.numpy())
    np.testing.assert_allclose(d_neg, sn_t.grad.numpy())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 20), seed=st.integers(0, 2**31), scale=st.floats(0.01, 100.0))
def test_margin_mse_properties(n, seed, scale):
    """Zero when the margins agree (whatever the score scales); a per-query shift of either
    model's two scores leaves the loss unchanged."""
    rng = np.random.default_rng(seed)
    tp, tn = scale * rng.standard_normal((2, n))
    offset = 50 * rng.standard_normal(n)
    assert margin_mse(tp + offset, tn + offset, tp, tn) == pytest.approx(0.0, abs=1e-9 * scale)
    sp, sn = rng.standard_normal((2, n))
    base = margin_mse(sp, sn, tp, tn)
    shift_s, shift_t = rng.standard_normal(n), rng.standard_normal(n)
    assert margin_mse(sp + shift_s, sn + shift_s, tp, tn) == pytest.approx(base, rel=1e-9, abs=1e-9)
    assert margin_mse(sp, sn, tp + shift_t, tn + shift_t) == pytest.approx(base, rel=1e-9, abs=1e-9)


def test_bad_input_margin_mse():
    with pytest.raises(ShapeError, match="one shape"):
        margin_mse(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(4))
    with pytest.raises(DTypeError, match="student_pos: expected floating"):
        margin_mse(np.zeros(3, int), np.zeros(3), np.zeros(3), np.zeros(3))
