"""Triton kernels of the torch backend.

Importing this package does not import triton; each kernel module does, and is imported only
when an op is about to launch its kernel. Whether a kernel is compiled for the GPU or run by the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) is fixed when its module is imported.
"""
