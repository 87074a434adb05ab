"""``gaussian`` on the backends that implement it (Numba), against the float64 reference.

Expected values come from :func:`qkv.reference.forms.gaussian_attention.gaussian` in float64
(itself checked against loops in ``tests/reference/test_forms_gaussian.py``). Outputs are
poisoned, so an element the kernel does not write fails; fallbacks are errors here.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

import qkv
from qkv import _dispatch, _outputs
from qkv.reference.forms import gaussian_attention as reference
from qkv.testing import check_backend

TOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.delenv("QKV_BACKEND", raising=False)
    monkeypatch.setenv("QKV_STRICT", "1")
    _dispatch.reset_warnings()
    with _outputs.poisoned():
        yield


def inputs(shape, H, G, mixture, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    offsets = rng.standard_normal((H, G))
    scales = np.exp(rng.standard_normal((H, G)))
    logits = rng.standard_normal((H, G)) if mixture == "sum" else None
    return [None if a is None else a.astype(dtype) for a in (x, offsets, scales, logits)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mixture", ["product", "sum"])
@pytest.mark.parametrize(
    ("shape", "axis", "H", "G"),
    [((5,), 0, 1, 1), ((2, 3, 37), -1, 4, 3), ((2, 19, 3), 1, 3, 2), ((4, 2, 64), 0, 2, 5)],
)
def test_numba_matches_reference(dtype, mixture, shape, axis, H, G):
    cast = inputs(shape, H, G, mixture, dtype)
    out, w = qkv.gaussian(*cast, axis=axis, mixture=mixture, return_weights=True, backend="numba")
    ref_out, ref_w = reference.gaussian(
        *(None if a is None else a.astype(np.float64) for a in cast),
        axis=axis,
        mixture=mixture,
        return_weights=True,
    )
    assert out.dtype == dtype and w.dtype == dtype and out.shape == shape
    np.testing.assert_allclose(out, ref_out, rtol=TOL[dtype], atol=TOL[dtype])
    np.testing.assert_allclose(w, ref_w, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_zero_variance_is_uniform(dtype):
    x = np.full((3, 12), -77.125, dtype=dtype)
    offsets = np.full((3, 2), 4.0, dtype=dtype)
    scales = np.full((3, 2), 0.05, dtype=dtype)
    out, w = qkv.gaussian(x, offsets, scales, return_weights=True, backend="numba")
    np.testing.assert_array_equal(w, np.full_like(w, 0.25))
    np.testing.assert_allclose(out, x / 4, rtol=1e-6)


def test_numba_float16_falls_back_visibly(monkeypatch):
    monkeypatch.delenv("QKV_STRICT")
    x, offsets, scales, _ = inputs((2, 8), 2, 2, "product", np.float16)
    with pytest.warns(qkv.FallbackWarning, match="float16"):
        out = qkv.gaussian(x, offsets, scales, backend="numba")
    assert out.dtype == np.float16


def test_numba_bad_input_gets_the_reference_errors():
    x = np.zeros((2, 8))
    with pytest.raises(qkv.ShapeError, match="scales"):
        qkv.gaussian(x, np.zeros((2, 3)), np.ones((3, 3)), backend="numba")


def test_conformance_kit():
    report = check_backend("numba", ["gaussian"], max_examples=40, seed=0)
    assert report.ok, report.text()
