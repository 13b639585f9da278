"""The planner: choose TIDE's refresh interval R from a routing trace and a cost model.

Owns the drift statistics of a trace (d, the per-step turnover of the top-C set; f(a), the miss ratio of
a set a steps old) and `solve_interval`. The objective is exact for the trace: for each candidate R the
TIDE plans are replayed (integers only) and their modelled PCIe seconds plus CPU seconds summed.
Solved by exact enumeration: R is one integer in 1..T (T <= steps per block, at most a few dozen), so
enumeration is exact and costs milliseconds; a MILP would have to tabulate the same nonlinear terms.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from tide.cost import CostModel
from tide.policy import PolicyContext
from tide.refresh import TideRefresh
from tide.trace import RoutingTrace, replay


@dataclass(frozen=True)
class Candidate:
    interval: int
    io_s: float  # modelled host->GPU copy seconds over the trace
    cpu_s: float  # modelled CPU expert seconds over the trace
    step_s: float  # modelled MoE wall seconds with overlap (CostModel.layer_step_s), for reference
    fetched_experts: int
    gpu_hit_ratio: float

    @property
    def objective_s(self) -> float:
        return self.io_s + self.cpu_s


@dataclass
class Solution:
    interval: int
    per_layer: dict[int, int]
    candidates: list[Candidate]
    drift: float  # d: mean fraction of the top-C set replaced between consecutive denoising steps
    miss_by_age: list[float] = field(default_factory=list)  # f(a): miss ratio of the top-C set a steps later
    method: str = "exact enumeration over R of the replayed trace (PCIe s + CPU s)"
    by_overlap: int = 0  # the R the overlap-aware objective (modelled wall time, layer_step_s) would choose


def sub_trace(trace: RoutingTrace, layers: list[int]) -> RoutingTrace:
    return RoutingTrace(trace.num_experts, layers, [r for r in trace.records if r.layer in layers])


def evaluate(trace: RoutingTrace, cost: CostModel, slots: int, interval: int, **options) -> Candidate:
    ctx = PolicyContext(trace.num_experts, tuple(trace.layers), slots)
    out = replay(trace, TideRefresh(ctx, refresh_interval=interval, **options), slots, cost)
    return Candidate(interval, out.io_s, out.cpu_s, out.step_s, out.fetched_experts, out.gpu_hit_ratio)


def solve_interval(trace: RoutingTrace, cost: CostModel, slots: int, max_interval: int, per_layer: bool = False,
                   objective: str = "sum", **options) -> Solution:
    """argmin over R in 1..max_interval of J(R) = sum over records of |fetch_R| * fetch_s + sum_{e in cpu_R} cpu_s(n_e)
    (objective "sum": PCIe plus CPU seconds, as the paper), or of the modelled wall time with copies, device and
    host workers overlapping as the executor runs them (objective "overlap": sum of CostModel.layer_step_s).

    Ties go to the larger R (fewer refreshes, less I/O). With per_layer=True each layer gets its own argmin
    (J is a sum of per-layer terms, so the per-layer argmins minimise the total). Both choices are reported.
    """
    if max_interval < 1:
        raise ValueError(f"max_interval must be >= 1, got {max_interval}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: choose one of {sorted(OBJECTIVES)}")
    key = OBJECTIVES[objective]
    candidates = [evaluate(trace, cost, slots, r, **options) for r in range(1, max_interval + 1)]
    best = min(candidates, key=lambda c: (key(c), -c.interval)).interval
    chosen = dict.fromkeys(trace.layers, best)
    if per_layer:
        for layer in trace.layers:
            one = sub_trace(trace, [layer])
            layer_c = [evaluate(one, cost, slots, r, **options) for r in range(1, max_interval + 1)]
            chosen[layer] = min(layer_c, key=lambda c: (key(c), -c.interval)).interval
    drift, miss = drift_stats(trace, slots, max_interval)
    overlap = min(candidates, key=lambda c: (c.step_s, -c.interval)).interval
    method = f"exact enumeration over R of the replayed trace ({OBJECTIVE_TEXT[objective]})"
    return Solution(best, chosen, candidates, drift, miss, method, overlap)


OBJECTIVES = {"sum": lambda c: c.objective_s, "overlap": lambda c: c.step_s}
OBJECTIVE_TEXT = {"sum": "PCIe s + CPU s", "overlap": "modelled wall s with overlap"}


def top_set(counts: dict[int, int], c: int) -> frozenset[int]:
    return frozenset(sorted(counts, key=lambda e: (-counts[e], e))[:c])


def drift_stats(trace: RoutingTrace, slots: int, max_age: int) -> tuple[float, list[float]]:
    """(d, f): d = mean |S_s \\ S_{s+1}| / |S_s| over consecutive denoising steps of a block, S = top-C set;
    f[a] = routed pairs missed by S_s at step s+a / routed pairs at s+a (a = 0..max_age-1, same block)."""
    steps: dict[tuple[int, int], list[tuple[int, dict[int, int]]]] = defaultdict(list)
    for r in trace.records:
        if r.kind == "denoise":
            steps[(r.layer, r.block)].append((r.step, r.counts))
    turnover, missed, total = [], [0.0] * max_age, [0.0] * max_age
    for seq in steps.values():
        seq.sort(key=lambda t: t[0])
        sets = [top_set(c, slots) for _, c in seq]
        turnover += [len(a - b) / len(a) for a, b in zip(sets, sets[1:], strict=False) if a]
        for i, chosen in enumerate(sets):
            for age in range(min(max_age, len(seq) - i)):
                counts = seq[i + age][1]
                missed[age] += sum(n for e, n in counts.items() if e not in chosen)
                total[age] += sum(counts.values())
    d = sum(turnover) / len(turnover) if turnover else 0.0
    return d, [m / t if t else 0.0 for m, t in zip(missed, total, strict=True)]
