"""The TIDE policy: interval-based refresh of a per-layer resident set; misses computed on the CPU.

Per MoE layer: a resident set of `slots` experts and a hit counter. On a refresh step (denoising step
index within the block a multiple of R, and every step of the first generated block unless
`first_block_every_step=False`) it promotes the top-C experts by score and demotes the least-hit
residents, at most as many as it promotes; between refreshes every miss runs on the CPU. Residency
carries over between blocks. R = 1 is "refresh every step". Cache-writing forwards (prefill, commit)
never refresh: their misses run on the CPU.
Flags beyond the paper: rank="interval" scores by tokens routed since the last refresh (the paper's
public code ranks by the refresh step alone); `cost_fetch` the per-expert choice between CPU and fetch on
non-refresh steps (fetch when copy + GPU time beats CPU time); `prefetch_next` loads a layer's likely
top-C while the layer before it computes; R may be a per-layer mapping.
"""

from __future__ import annotations

from collections.abc import Mapping

from tide.cost import CostModel
from tide.policy import Plan, PolicyContext, StepInfo, register_policy

RANKS = ("step", "interval")


@register_policy("tide")
class TideRefresh:
    def __init__(self, ctx: PolicyContext, refresh_interval: int | Mapping[int, int] = 4, rank: str = "step",
                 first_block_every_step: bool = True, cost: CostModel | None = None, cost_fetch: bool = False,
                 prefetch_next: bool = False) -> None:
        if cost_fetch and cost is None:
            raise ValueError("cost_fetch=True needs a cost model (a hardware profile or a calibration)")
        intervals = refresh_interval if isinstance(refresh_interval, Mapping) else dict.fromkeys(
            ctx.moe_layers, refresh_interval)
        if any(not isinstance(r, int) or r < 1 for r in intervals.values()):
            raise ValueError(f"refresh_interval must be a positive integer per layer, got {refresh_interval!r}")
        if rank not in RANKS:
            raise ValueError(f"rank must be one of {RANKS}, got {rank!r}")
        self.interval = dict(intervals)
        self.rank, self.first_block_every_step = rank, first_block_every_step
        self.cost = cost if cost_fetch else None  # per-expert CPU-or-fetch choice between refreshes
        self.prefetch_next = prefetch_next
        self.last_counts: dict[int, dict[int, int]] = {}  # layer -> tokens per expert in its last denoising forward
        self.hits: dict[int, dict[int, int]] = {layer: {} for layer in ctx.moe_layers}  # tokens since refresh
        self.first_block: int | None = None  # the first block seen denoising = the first generated block
        self.last: tuple[int, int] = (-1, -1)  # (block, step) last seen: going back means a new request
        self.warm = {layer: frozenset(sorted(range(ctx.num_experts), key=lambda e: (-p.get(e, 0), e))[: ctx.slots])
                     for layer, p in (ctx.popularity or {}).items()}

    @staticmethod
    def wants_profile(options: Mapping) -> bool:
        return options.get("refresh_interval") == "auto"

    @staticmethod
    def from_profile(ctx: PolicyContext, trace, cost: CostModel | None = None, per_layer_interval: bool = False,
                     **options) -> tuple[TideRefresh, str]:
        """Resolve refresh_interval="auto" with the planner over a profiling trace; returns (policy, why)."""
        from tide.planner import solve_interval  # the planner replays this policy: import it lazily

        if cost is None:
            raise ValueError("refresh_interval='auto' needs a cost model (a hardware profile or a calibration)")
        options.pop("refresh_interval", None)
        steps = max((r.step + 1 for r in trace.records if r.kind == "denoise"), default=1)
        sol = solve_interval(trace, cost, ctx.slots, steps, per_layer=per_layer_interval, rank=options.get(
            "rank", "step"), first_block_every_step=options.get("first_block_every_step", True))
        interval = sol.per_layer if per_layer_interval else sol.interval
        best = min(c.objective_s for c in sol.candidates)
        why = (f"refresh interval {interval} chosen by {sol.method} over R=1..{steps}: modelled {best * 1e3:.2f} ms "
               f"vs {sol.candidates[0].objective_s * 1e3:.2f} ms at R=1; drift d={sol.drift:.3f}")
        return TideRefresh(ctx, refresh_interval=interval, cost=cost, **options), why

    def warm_start(self, layer: int) -> frozenset[int]:
        return self.warm.get(layer, frozenset())

    def is_refresh(self, at: StepInfo) -> bool:
        if at.kind != "denoise":
            return False
        if (at.block, at.step) < self.last:
            self.first_block = None  # a new request started
        self.last = (at.block, at.step)
        if self.first_block is None:
            self.first_block = at.block
        return self.refresh_due(at)

    def refresh_due(self, at: StepInfo) -> bool:
        """Whether `at` is a refresh point (no state change; the first block as currently known)."""
        if at.kind != "denoise":
            return False
        if self.first_block_every_step and at.block == (self.first_block if self.first_block is not None
                                                         else at.block):
            return True
        return at.step % self.interval[at.layer] == 0

    def prefetch(self, at: StepInfo, resident: frozenset[int], slots: int) -> Plan | None:
        """With prefetch_next: just before layer `at.layer` refreshes, load its likely top-C (ranked by the
        tokens it routed in its previous forward) on the copy stream while the layer before computes."""
        last = self.last_counts.get(at.layer)
        if not self.prefetch_next or not last or not self.refresh_due(at):
            return None
        top = sorted(last, key=lambda e: (-last[e], e))[:slots]
        promote = [e for e in top if e not in resident]
        hits = self.hits[at.layer]
        demotable = sorted(resident - set(top), key=lambda e: (hits.get(e, 0), e))
        evict = demotable[: max(0, len(promote) - (slots - len(resident)))]
        return Plan(fetch=frozenset(promote), evict=frozenset(evict)) if promote else None

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        if at.kind == "denoise":
            self.last_counts[at.layer] = dict(counts)
        hits = self.hits[at.layer]
        for e, c in counts.items():
            hits[e] = hits.get(e, 0) + c
        if self.is_refresh(at):
            score = hits if self.rank == "interval" else counts
            top = sorted(score, key=lambda e: (-score[e], e))[:slots]
            promote = [e for e in top if e not in resident]
            demotable = sorted(resident - set(top), key=lambda e: (hits.get(e, 0), e))  # least hit first
            evict = demotable[: max(0, len(promote) - (slots - len(resident)))]
            self.hits[at.layer] = {}
            kept = (resident - set(evict)) | set(promote)
            return Plan(fetch=frozenset(promote), evict=frozenset(evict), cpu=frozenset(counts) - kept)
        misses = set(counts) - resident
        if self.cost is None:
            return Plan(cpu=frozenset(misses))
        return self._cost_choice(counts, resident, misses, slots, hits)

    def _cost_choice(self, counts: Mapping[int, int], resident: frozenset[int], misses: set[int], slots: int,
                     hits: Mapping[int, int]) -> Plan:
        """Fiddler's rule generalised: fetch a miss when copy + GPU time beats CPU time, if a slot can be had."""
        cost = self.cost
        wants = sorted((e for e in misses if cost.fetch_s() + cost.gpu_s(counts[e]) < cost.cpu_s(counts[e])),
                       key=lambda e: (-counts[e], e))
        free = slots - len(resident)
        victims = sorted((e for e in resident if e not in counts), key=lambda e: (hits.get(e, 0), e))
        n = min(len(wants), free + len(victims))
        fetch = frozenset(wants[:n])
        evict = frozenset(victims[: max(0, n - free)])
        return Plan(fetch=fetch, evict=evict, cpu=frozenset(misses) - fetch)
