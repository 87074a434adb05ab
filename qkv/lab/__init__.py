"""Real data for qkv: attention captured from trained models on text that Python ships.

:mod:`qkv.lab.minilm` captures the queries, keys and values of the MiniLM sentence encoder
(``qkv lab capture-minilm``) and loads the embedded capture with NumPy alone.
"""
