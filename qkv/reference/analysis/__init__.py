"""Measuring, calibrating and distilling attention (the catalog family ``analysis``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.analysis.margin_mse_loss import margin_mse
from qkv.reference.analysis.minilm_distillation import minilm_distill

__all__ = ["margin_mse", "minilm_distill"]
