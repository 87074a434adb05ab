"""Real data and real models for qkv, all of them runnable on a laptop CPU.

* :mod:`qkv.lab.minilm` captures the queries, keys and values of the MiniLM sentence encoder
  (``qkv lab capture-minilm``) and loads the embedded capture with NumPy alone;
  :mod:`qkv.lab.encoder` runs that encoder with its attention computed by qkv ops, so that any
  layer's attention can be swapped for a catalog mechanism.
* :mod:`qkv.lab.tasks` generates seeded long-context tasks (passkey retrieval, associative
  recall, copying); :mod:`qkv.lab.decoder` is the small decoder trained on them
  (:mod:`qkv.lab.train`, ``qkv lab train-decoder``) whose weights ship in ``qkv/data``.
* :mod:`qkv.lab.engine` prefills and decodes with an explicit KV cache and the KV-policy
  protocol; :mod:`qkv.lab.kv_eval` (``qkv lab kv-eval``) scores KV methods on the tasks.
"""
