"""The conformance tests that ``pytest --qkv-backend=NAME --pyargs qkv.testing`` collects.

One test per (backend, op); see :mod:`qkv.testing.plugin` for the options.
"""

from __future__ import annotations

from qkv.testing.plugin import Target


def test_conformance(qkv_target: Target) -> None:
    """The backend's op matches the float64 reference on hypothesis-drawn inputs."""
    qkv_target.check()
