"""full-offload: nothing is kept between forwards; every routed expert is copied in, every forward.

What accelerate's device_map offload does per module, without its hooks: the slots are used as a per-forward
landing area (lowest ids first), the overflow goes through the staging ring, and everything is forgotten
at the next forward. Bytes host->GPU = unique routed experts x expert bytes, every forward.
"""

from __future__ import annotations

from collections.abc import Mapping

from tide.policy import Plan, PolicyContext, StepInfo, register_policy


@register_policy("full-offload")
class FullOffload:
    def __init__(self, ctx: PolicyContext) -> None:
        pass

    def warm_start(self, layer: int) -> frozenset[int]:
        return frozenset()

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        routed = sorted(counts)
        return Plan(evict=resident, fetch=frozenset(routed[:slots]), stream=frozenset(routed[slots:]))
