"""A lower bound on the expert-path time of any policy, from a routing trace and a cost model (modelled).

The oracle has perfect knowledge of future routing and perfect overlap. Every policy's modelled time for
a layer-forward (CostModel.layer_step_s) is at least max(device compute, copies, CPU compute), where the
device computes the set D of routed experts, the CPU the rest P, and at least |D| - C of D are copied in
(only C slots can hold experts from before). The host runs P on W workers, so its time is at least
sum_P cpu_s / W. Two relaxations of that, each a valid bound, and their max:
  compute balance: min over fractional D of max(sum_D gpu_s, sum_P cpu_s / W)   (copies dropped)
  copy balance:    min over D of max((|D| - C)+ * fetch_s, sum_P cpu_s / W)     (device compute dropped)
No policy given C slots can beat it on that trace; `fraction_of_bound` says how close one comes.
"""

from __future__ import annotations

from tide.cost import CostModel
from tide.trace import RoutingTrace


def compute_balance_s(gpu: list[float], cpu: list[float]) -> float:
    """min over x in [0,1]^n of max(sum x*g, sum (1-x)*c): move experts to the device by c/g, split the last."""
    order = sorted(range(len(gpu)), key=lambda i: cpu[i] / gpu[i] if gpu[i] > 0 else float("inf"), reverse=True)
    device, host = 0.0, sum(cpu)
    for i in order:
        if device + gpu[i] >= host - cpu[i]:  # the crossing expert: split it so both sides are equal
            return (device * cpu[i] + host * gpu[i]) / (gpu[i] + cpu[i]) if gpu[i] + cpu[i] > 0 else host
        device, host = device + gpu[i], host - cpu[i]
    return max(device, host)


def copy_balance_s(cpu: list[float], slots: int, fetch_s: float) -> float:
    """min over k of max(k * fetch_s, CPU of what is neither among the C dearest nor the next k copied)."""
    rest = sorted(cpu, reverse=True)[slots:]
    tail = sum(rest)
    best = tail
    for k, c in enumerate(rest, start=1):
        tail -= c
        best = min(best, max(k * fetch_s, tail))
    return best


def layer_forward_bound_s(counts: dict[int, int], slots: int, cost: CostModel) -> float:
    gpu = [cost.gpu_s(n) for n in counts.values()]
    cpu = [cost.cpu_s(n) / max(1, cost.cpu_workers) for n in counts.values()]  # W workers share the host work
    return max(compute_balance_s(gpu, cpu), copy_balance_s(cpu, slots, cost.fetch_s()))


def oracle_bound_s(trace: RoutingTrace, slots: int, cost: CostModel) -> float:
    return sum(layer_forward_bound_s(r.counts, slots, cost) for r in trace.records)
