"""reference: every expert resident on the GPU. The lossless ground truth; needs all the memory."""

from __future__ import annotations

from collections.abc import Mapping

from tide.policy import Plan, PolicyContext, StepInfo, register_policy


@register_policy("reference")
class Reference:
    def __init__(self, ctx: PolicyContext) -> None:
        if ctx.slots < ctx.num_experts:
            raise ValueError(f"policy 'reference' keeps all {ctx.num_experts} experts per layer resident; "
                             f"the budget gives {ctx.slots} slots (use --gpu-budget all)")
        self.all = frozenset(range(ctx.num_experts))

    def warm_start(self, layer: int) -> frozenset[int]:
        return self.all

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        return Plan()
