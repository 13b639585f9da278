"""cpu-fallback: a static resident set, the `slots` most popular experts per layer from a profiling pass
(Fiddler); every other routed expert is computed on the CPU. Placement never changes while decoding, so
nothing is fetched after start-up.
"""

from __future__ import annotations

from collections.abc import Mapping

from tide.policy import Plan, PolicyContext, StepInfo, register_policy


@register_policy("cpu-fallback")
class CPUFallback:
    @staticmethod
    def wants_profile(options: Mapping) -> bool:
        return True  # the engine runs a profiling pass and passes its counts as ctx.popularity

    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.popularity is None:
            raise ValueError("policy 'cpu-fallback' needs expert popularity from a profiling pass")
        self.static = {layer: frozenset(sorted(range(ctx.num_experts), key=lambda e: (-counts.get(e, 0), e))
                                        [: ctx.slots])
                       for layer, counts in ((lay, ctx.popularity.get(lay, {})) for lay in ctx.moe_layers)}

    def warm_start(self, layer: int) -> frozenset[int]:
        return self.static[layer]

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        return Plan(cpu=frozenset(counts) - resident)
