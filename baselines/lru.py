"""lru: a per-layer cache of `slots` experts with least-recently-used eviction (mixtral-offloading).

Hits run on the GPU. Misses are fetched (most tokens first, then lower id), evicting the least recently used
experts that this forward does not need; misses beyond what the cache can take this forward are streamed
through the staging ring. Recency: every expert used in a forward is touched, in ascending id order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from tide.policy import Plan, PolicyContext, StepInfo, register_policy


@register_policy("lru")
class LRU:
    def __init__(self, ctx: PolicyContext) -> None:
        self.recency: dict[int, OrderedDict[int, None]] = {layer: OrderedDict() for layer in ctx.moe_layers}

    def warm_start(self, layer: int) -> frozenset[int]:
        return frozenset()  # a cold cache

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        order = self.recency[at.layer]
        misses = sorted(set(counts) - resident, key=lambda e: (-counts[e], e))
        victims = [e for e in order if e not in counts]  # oldest first, never one this forward uses
        free = slots - len(resident)
        n_fetch = min(len(misses), free + len(victims))
        fetch, stream = misses[:n_fetch], misses[n_fetch:]
        evict = victims[: max(0, n_fetch - free)]
        for e in evict:
            del order[e]
        for e in sorted((set(counts) & resident) | set(fetch)):
            order[e] = None
            order.move_to_end(e)
        return Plan(fetch=frozenset(fetch), evict=frozenset(evict), stream=frozenset(stream))
