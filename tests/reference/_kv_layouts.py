"""Caches with one field of the wrong shape, for the KV policies' layout checks
(:func:`qkv.reference.kv.cache_checks.check_layout`)."""

from __future__ import annotations

from dataclasses import replace

from qkv.reference.kv.policy import CacheView


def misshapen(c: CacheView) -> list[CacheView]:
    """``c`` (two KV heads, head dim above 4) with, in turn, each field's shape broken: keys
    without their batch axis, one value head, indices and positions cut short, one
    ``next_position`` head, three query heads (not a multiple of two), a query dim of 4."""
    return [
        replace(c, keys=c.keys[0]),
        replace(c, values=c.values[:, :1]),
        replace(c, indices=c.indices[..., :5]),
        replace(c, positions=c.positions[..., :3]),
        replace(c, next_position=c.next_position[:, :1]),
        replace(c, queries=c.queries[:, :3]),
        replace(c, queries=c.queries[..., :4]),
    ]
