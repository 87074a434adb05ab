"""Other score functions and shapes of attention (the catalog family ``forms``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.forms.agent_attention import agent
from qkv.reference.forms.ffnified_mixer import ffnet_block, ffnified, fuse, fuse_block, fuse_rep
from qkv.reference.forms.gaussian_attention import GaussianParams, gaussian
from qkv.reference.forms.icl_attention import icl_regression
from qkv.reference.forms.selective_attention import selective
from qkv.reference.forms.sigmoid_attention import sigmoid
from qkv.reference.forms.tensor_attention import tensor, tensor_approx, tensor_brute_force

__all__ = [
    "GaussianParams",
    "agent",
    "ffnet_block",
    "ffnified",
    "fuse",
    "fuse_block",
    "fuse_rep",
    "gaussian",
    "icl_regression",
    "selective",
    "sigmoid",
    "tensor",
    "tensor_approx",
    "tensor_brute_force",
]
