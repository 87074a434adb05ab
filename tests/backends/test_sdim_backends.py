"""SDIM (``qkv.sdim``) on the numba backend against the float64 NumPy reference.

The numba kernel groups behaviours by bucket once per (user, hash) and binary-searches each
candidate's code (:mod:`qkv.backends.numba._sdim`); the reference compares all codes. Codes
must agree bit for bit, and the interest to rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv import _dispatch, _outputs
from qkv.backends import numba as numba_backend
from qkv.errors import Unsupported
from qkv.reference.recsys.sdim_hashing import random_planes, sdim, simhash

pytestmark = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


def make_inputs(B, C, L, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    targets = rng.standard_normal((B, C, d))
    behaviours = rng.standard_normal((B, L, d))
    behaviours[:, ::5] = targets[:, :1]  # sure collisions
    valid = rng.random((B, L)) < 0.8
    return targets.astype(dtype), behaviours.astype(dtype), valid


@pytest.mark.parametrize("tau", [1, 4, 17, 64])
def test_numba_codes_equal_the_reference_codes(tau):
    from qkv.backends.numba import _sdim

    rng = np.random.default_rng(tau)
    x = rng.standard_normal((3, 11, 7)).astype(np.float32)
    planes = random_planes(7, 5, tau, rng=rng)
    np.testing.assert_array_equal(_sdim.simhash(x, planes), simhash(x, planes))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 5, 37, 8, 6, 4), (3, 9, 120, 16, 3, 12)])
def test_numba_matches_reference(shape, dtype, normalize):
    B, C, L, d, m, tau = shape
    targets, behaviours, valid = make_inputs(B, C, L, d, dtype)
    planes = random_planes(d, m, tau, rng=1)
    with _outputs.poisoned():
        got = numba_backend.sdim(targets, behaviours, planes, valid=valid, normalize=normalize)
    want = sdim(
        targets.astype(np.float64), behaviours.astype(np.float64), planes,
        valid=valid, normalize=normalize,
    )  # fmt: skip
    assert got.dtype == dtype
    tol = 1e-6 if dtype == np.float32 else 1e-13
    scale = 1.0 if normalize else np.abs(behaviours).sum(axis=1).max()
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


def test_numba_user_without_behaviours_and_dispatch():
    targets, behaviours, valid = make_inputs(2, 3, 10, 4, np.float64)
    valid[0] = False
    planes = random_planes(4, 3, 2, rng=2)
    got = qkv.sdim(targets, behaviours, planes, valid=valid, backend="numba")
    assert (got[0] == 0).all()
    np.testing.assert_allclose(got, sdim(targets, behaviours, planes, valid=valid), atol=1e-13)


def test_numba_declines_half_precision():
    targets, behaviours, _ = make_inputs(1, 2, 5, 4, np.float16)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.sdim(targets, behaviours, random_planes(4, 2, 3, rng=0))


def test_conformance_kit():
    """The kit's hypothesis cases (``qkv.testing.ops_recsys``) on the numba backend."""
    assert "sdim" in _dispatch.OPS
    from qkv.testing import check_backend

    report = check_backend("numba", ops=["sdim"], max_examples=25, dtypes=("float32", "float64"))
    assert report.ok, report.text()
