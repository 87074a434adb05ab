"""The conformance kit on every built-in backend that can run on this machine.

One test per (backend, op), parametrized by the ``qkv`` pytest plugin (see
:mod:`qkv.testing.plugin`): an op a backend does not implement yet, and a backend that cannot
run here (CuPy without a GPU), are skipped with the reason. ``pytest --qkv-backend=NAME``
checks other backends instead, and ``--qkv-max-examples`` draws more examples.

The sizes below keep this file within about three minutes on two cores: each (op, dtype) draws
at most ``QKV_MAX_EXAMPLES`` examples and stops drawing after ``QKV_TIME_BUDGET`` seconds
(Numba compiles on first use, the Triton interpreter is slow).
"""

from __future__ import annotations

from qkv.testing.plugin import Target

QKV_BACKENDS = ("reference", "numba", "torch", "cupy")
QKV_MAX_EXAMPLES = 100
QKV_DTYPES = ("float32", "float16", "bfloat16")
QKV_TIME_BUDGET = 8.0


def test_conformance(qkv_target: Target) -> None:
    """The backend's op matches the float64 reference on hypothesis-drawn inputs."""
    qkv_target.check()
