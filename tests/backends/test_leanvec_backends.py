"""LeanVec's first stage (``qkv.lvq_dot``) on the numba backend against the float64 reference.

The numba kernel reads the uint8 codes and widens them inside the dot product
(:mod:`qkv.backends.numba._lvq`); the reference decodes the vectors to floats first
(:func:`qkv.reference.retrieval.leanvec_projection.lvq_dot`).
"""

from __future__ import annotations

import numpy as np
import pytest

import qkv
from qkv import _dispatch, _outputs
from qkv.backends import numba as numba_backend
from qkv.errors import Unsupported
from qkv.reference.retrieval.leanvec_projection import LeanVec, lvq_dot

pytestmark = pytest.mark.skipif(
    not numba_backend.available()[0], reason=f"numba: {numba_backend.available()[1]}"
)


def make_inputs(Nq, N, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    queries = rng.standard_normal((Nq, d)).astype(dtype)
    codes = rng.integers(0, 256, (N, d)).astype(np.uint8)
    scales = (rng.random(N) / 255).astype(dtype)
    offsets = rng.standard_normal(N).astype(dtype)
    return queries, codes, scales, offsets


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 5), (8, 513, 64)])
def test_numba_matches_reference(shape, dtype):
    args = make_inputs(*shape, dtype)
    with _outputs.poisoned():
        got = numba_backend.lvq_dot(*args)
    want = lvq_dot(*(a.astype(np.float64) if a.dtype != np.uint8 else a for a in args))
    assert got.dtype == dtype and got.shape == shape[:2]
    tol = 2e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def test_search_through_numba_equals_the_reference_search():
    rng = np.random.default_rng(1)
    X, Q = rng.standard_normal((300, 24)), rng.standard_normal((12, 24))
    index = LeanVec.build(X, 6, kind="ood", queries=rng.standard_normal((40, 24)))
    want = index.search(Q, 5, candidates=20)
    with qkv.use_backend("numba"):
        got = index.search(Q, 5, candidates=20)
    np.testing.assert_array_equal(got.candidates, want.candidates)
    np.testing.assert_array_equal(got.indices, want.indices)


def test_numba_declines_half_precision():
    args = make_inputs(2, 3, 4, np.float16)
    with pytest.raises(Unsupported, match="float32 and float64"):
        numba_backend.lvq_dot(*args)


def test_conformance_kit():
    """The kit's hypothesis cases (``qkv.testing.ops_retrieval``) on the numba backend."""
    assert "lvq_dot" in _dispatch.OPS
    from qkv.testing import check_backend

    report = check_backend("numba", ops=["lvq_dot"], max_examples=25, dtypes=("float32", "float64"))
    assert report.ok, report.text()
