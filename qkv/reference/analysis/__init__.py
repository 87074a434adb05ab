"""Measuring, calibrating and distilling attention (the catalog family ``analysis``).

One module per paper; every catalog id of the family is importable from here under its name.
"""

from qkv.reference.analysis.act_calibration import act
from qkv.reference.analysis.circuit_tools import circuits
from qkv.reference.analysis.margin_mse_loss import margin_mse
from qkv.reference.analysis.minilm_distillation import minilm_distill
from qkv.reference.analysis.retrieval_score import retrieval_heads
from qkv.reference.analysis.sink_rate import sink_metric
from qkv.reference.analysis.var_redistribution import var
from qkv.reference.analysis.vocab_navigation import vocab_keys

__all__ = [
    "act",
    "circuits",
    "margin_mse",
    "minilm_distill",
    "retrieval_heads",
    "sink_metric",
    "var",
    "vocab_keys",
]
