"""KV-cache eviction, merging and quantisation.

Every method is a :class:`~qkv.reference.kv.policy.KVPolicy` (score the cached tokens, keep
some) or a :class:`~qkv.reference.kv.policy.KVSelector` (choose per decode step which keys to
read); :mod:`qkv.lab.engine` runs them on the lab decoder.
"""

from qkv.reference.kv.critic_policy import Critic, critic
from qkv.reference.kv.duo_attention import DuoAttention, duo
from qkv.reference.kv.mixed_precision import mixed_attention
from qkv.reference.kv.policy import CacheView, KeptCache, KVPolicy, KVSelector, keep_top
from qkv.reference.kv.quota_policy import QuoTA, quota
from qkv.reference.kv.razor_policy import Razor, razor
from qkv.reference.kv.saq_policy import SAQ, saq
from qkv.reference.kv.snapkv_policy import SnapKV, snapkv
from qkv.reference.kv.streaming_llm import StreamingLLM, streaming
from qkv.reference.kv.taskkv_policy import TaskKV, taskkv
from qkv.reference.kv.window_scoring import window_scores
from qkv.reference.kv.zipcache_policy import ZipCache, zipcache
from qkv.reference.kv.zipvl_policy import ZipVL, zipvl

__all__ = [
    "SAQ",
    "CacheView",
    "Critic",
    "DuoAttention",
    "KVPolicy",
    "KVSelector",
    "KeptCache",
    "QuoTA",
    "Razor",
    "SnapKV",
    "StreamingLLM",
    "TaskKV",
    "ZipCache",
    "ZipVL",
    "critic",
    "duo",
    "keep_top",
    "mixed_attention",
    "quota",
    "razor",
    "saq",
    "snapkv",
    "streaming",
    "taskkv",
    "window_scores",
    "zipcache",
    "zipvl",
]
