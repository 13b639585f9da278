"""tier-matched: the all-resident reference, with the host tier of a recorded run (lossless level b).

A host-tier policy (cpu-fallback, tide) computes some experts with the host's GEMM and the rest with the
device's; on a GPU the two round differently, so its outputs are compared with this reference instead of the
all-device one: each expert the recorded run computed on the host (same request, forward and layer) is
computed on the host here too, by the same host kernel, and every other routed expert on the device, streamed
through the staging ring (the same kernel on the same rows as a resident one, so it fits wherever full-offload
does, flash included). Bits must then match exactly; a difference is a slot, stream or refresh bug. The
recorded calls (`MoEExecutor.host_log`) are replayed in order, and a forward that does not match the record
(the routing diverged) is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tide.policy import Plan, PlanError, PolicyContext, StepInfo, register_policy


class TierMismatch(PlanError):
    """The replayed run routed differently from the recorded one."""


@register_policy("tier-matched")
class TierMatched:
    def __init__(self, ctx: PolicyContext, host_log: Sequence[tuple[StepInfo, frozenset[int]]] = ()) -> None:
        self.ctx, self.log, self.next = ctx, list(host_log), 0

    def warm_start(self, layer: int) -> frozenset[int]:
        return frozenset()

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        if self.next >= len(self.log):
            raise TierMismatch(f"tier-matched: layer-forward {self.next} at {at} is beyond the recorded run")
        recorded, host = self.log[self.next]
        self.next += 1
        where = (at.block, at.step, at.layer, at.kind)
        if (recorded.block, recorded.step, recorded.layer, recorded.kind) != where:
            raise TierMismatch(f"tier-matched: layer-forward {self.next - 1} is {where}, the recorded run's was "
                               f"{recorded}: the routing diverged")
        if not host <= counts.keys():
            raise TierMismatch(f"tier-matched: layer-forward {self.next - 1} ({where}) does not route the recorded "
                               f"host experts {sorted(host - counts.keys())}: the routing diverged")
        return Plan(stream=frozenset(counts) - host, cpu=host)
