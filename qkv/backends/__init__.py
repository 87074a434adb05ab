"""Built-in backends: ``reference`` (NumPy), ``numba`` (CPU), ``torch`` (+ Triton), ``cupy`` (CUDA).

Each is a module following the protocol described in :mod:`qkv._dispatch`; none imports its
library until an op runs.
"""
