"""The CuPy backend: CUDA C kernels in ``kernels/*.cu``, compiled by NVRTC at first use.

NumPy input is copied to the current GPU and the result copied back; CuPy input stays on its
device. Needs an NVIDIA GPU and the ``cupy-cuda13x`` package.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NAME = "cupy"


def available() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError:
        return (
            False,
            "the cupy package is not installed; fix: pip install 'qkv[cupy]' on a machine with an NVIDIA GPU",
        )
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or no device
        return (
            False,
            f"no usable NVIDIA GPU ({type(exc).__name__}: {exc}); fix: run on a machine with an NVIDIA GPU and driver",
        )
    if count < 1:
        return False, "no NVIDIA GPU found; fix: run on a machine with an NVIDIA GPU and driver"
    return True, f"{count} CUDA device(s)"


def asarray(x: Any) -> Any:
    import cupy

    return cupy.asarray(x)


def to_numpy(x: Any) -> np.ndarray:
    import cupy

    return cupy.asnumpy(x)
