"""KV-cache eviction, merging and quantisation.

Every method is a :class:`~qkv.reference.kv.policy.KVPolicy` (score the cached tokens, keep
some) or a :class:`~qkv.reference.kv.policy.KVSelector` (choose per decode step which keys to
read); :mod:`qkv.lab.engine` runs them on the lab decoder.
"""

from qkv.reference.kv.duo_attention import DuoAttention, duo
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, KVSelector, keep_top
from qkv.reference.kv.razor_policy import Razor, razor
from qkv.reference.kv.saq_policy import SAQ, saq
from qkv.reference.kv.snapkv_policy import SnapKV, snapkv
from qkv.reference.kv.streaming_llm import StreamingLLM, streaming
from qkv.reference.kv.taskkv_policy import TaskKV, taskkv
from qkv.reference.kv.zipcache_policy import ZipCache, zipcache

__all__ = [
    "SAQ",
    "CacheView",
    "DuoAttention",
    "KVPolicy",
    "KVSelector",
    "KeptCache",
    "Razor",
    "SnapKV",
    "StreamingLLM",
    "TaskKV",
    "ZipCache",
    "duo",
    "keep_top",
    "razor",
    "saq",
    "snapkv",
    "streaming",
    "taskkv",
    "zipcache",
]
