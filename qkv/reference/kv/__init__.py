"""KV-cache eviction, merging and quantisation.

Every method is a :class:`~qkv.reference.kv.policy.KVPolicy` (score the cached tokens, keep
some) or a :class:`~qkv.reference.kv.policy.KVSelector` (choose per decode step which keys to
read); :mod:`qkv.lab.engine` runs them on the lab decoder.
"""

from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, KVSelector, keep_top
from qkv.reference.kv.streaming_llm import StreamingLLM, streaming

__all__ = [
    "CacheView",
    "KVPolicy",
    "KVSelector",
    "KeptCache",
    "StreamingLLM",
    "keep_top",
    "streaming",
]
