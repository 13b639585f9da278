"""Routing traces: what every MoE layer routed in every forward, saved, loaded and replayed.

Owns the trace record (integers only: step position and tokens per expert), its .jsonl/.parquet files, and
`replay`, which runs any policy's planning over a trace with a cost model: exact traffic and modelled
time without executing a single expert. Knows nothing about models or tensors.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tide.cost import CostModel
from tide.policy import Plan, Policy, StepInfo, check_plan


@dataclass(frozen=True)
class TraceRecord:
    block: int
    step: int
    kind: str
    layer: int
    counts: dict[int, int]  # expert -> tokens routed to it in this forward


@dataclass
class RoutingTrace:
    num_experts: int
    layers: list[int]
    records: list[TraceRecord] = field(default_factory=list)

    def add(self, at: StepInfo, counts: Mapping[int, int]) -> None:
        self.records.append(TraceRecord(at.block, at.step, at.kind, at.layer, dict(counts)))

    def save(self, path: str | Path) -> Path:
        path = check_trace_path(path)
        rows = [{**asdict(r), "counts": {str(e): c for e, c in sorted(r.counts.items())}} for r in self.records]
        meta = {"num_experts": self.num_experts, "layers": self.layers}
        if path.suffix == ".parquet":
            import pandas as pd

            rows = [{**r, "counts": json.dumps(r["counts"])} for r in rows]  # parquet: counts as a JSON string
            frame = pd.DataFrame(rows, columns=["block", "step", "kind", "layer", "counts"])
            frame.attrs["tide"] = json.dumps(meta)
            frame.to_parquet(path)
            path.with_suffix(".meta.json").write_text(json.dumps(meta))
        elif path.suffix == ".jsonl":
            with path.open("w") as f:
                f.write(json.dumps({"meta": meta}) + "\n")
                f.writelines(json.dumps(row) + "\n" for row in rows)
        return path

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such trace file")
        try:
            if path.suffix == ".parquet":
                import pandas as pd

                meta = json.loads(path.with_suffix(".meta.json").read_text())
                rows = pd.read_parquet(path).to_dict("records")
            else:
                lines = path.read_text().splitlines()
                meta = json.loads(lines[0])["meta"]
                rows = [json.loads(line) for line in lines[1:]]
            records = [TraceRecord(int(r["block"]), int(r["step"]), r["kind"], int(r["layer"]),
                                   {int(e): int(c) for e, c in _counts(r["counts"]).items()}) for r in rows]
            return cls(meta["num_experts"], list(meta["layers"]), records)
        except (ValueError, KeyError, TypeError, IndexError, OSError) as err:  # JSON, parquet and shape errors
            raise ValueError(f"{path}: not a TIDE routing trace ({type(err).__name__}: {err}); record one with "
                             "`tide generate --trace`") from None


@dataclass
class ReplayResult:
    policy: str
    fetched_experts: int = 0
    streamed_experts: int = 0
    prefetched_experts: int = 0
    bytes_h2d: int = 0
    pairs_gpu: int = 0
    pairs_cpu: int = 0
    io_s: float = 0.0  # modelled seconds of host->GPU copies
    cpu_s: float = 0.0  # modelled seconds of CPU expert work
    step_s: float = 0.0  # modelled wall seconds of the MoE work, with overlap (CostModel.layer_step_s)

    @property
    def gpu_hit_ratio(self) -> float:
        total = self.pairs_gpu + self.pairs_cpu
        return self.pairs_gpu / total if total else 1.0


def replay(trace: RoutingTrace, policy: Policy, slots: int, cost: CostModel) -> ReplayResult:
    """Run `policy` over the trace (warm start, then one plan per record) and account traffic and time."""
    resident = {layer: frozenset(policy.warm_start(layer)) for layer in trace.layers}
    out = ReplayResult(getattr(policy, "name", type(policy).__name__))
    for r in trace.records:
        at = StepInfo(r.block, r.step, r.layer, r.kind)
        plan: Plan = policy.plan(at, r.counts, resident[r.layer], slots)
        check_plan(plan, r.counts, resident[r.layer], slots, who=f"policy {out.policy!r}, layer {r.layer}")
        resident[r.layer] = (resident[r.layer] - plan.evict) | plan.fetch
        moved = len(plan.fetch) + len(plan.stream)
        out.fetched_experts += len(plan.fetch)
        out.streamed_experts += len(plan.stream)
        out.pairs_cpu += sum(r.counts[e] for e in plan.cpu)
        out.pairs_gpu += sum(c for e, c in r.counts.items() if e not in plan.cpu)
        pre = _prefetch(policy, trace.layers, at, resident, slots)
        out.prefetched_experts += len(pre)
        moved += len(pre)
        out.bytes_h2d += moved * cost.expert_bytes
        out.io_s += moved * cost.fetch_s()
        out.cpu_s += sum(cost.cpu_s(r.counts[e]) for e in plan.cpu)
        out.step_s += cost.layer_step_s(plan, r.counts, prefetched=len(pre))
    return out


def _counts(value: str | dict) -> dict:
    return json.loads(value) if isinstance(value, str) else value


def _prefetch(policy: Policy, layers: list[int], at: StepInfo, resident: dict[int, frozenset[int]],
              slots: int) -> frozenset[int]:
    """Mirror of the executor's prefetch: the policy may load the next layer's experts now."""
    hook = getattr(policy, "prefetch", None)
    i = layers.index(at.layer)
    if hook is None or i + 1 == len(layers):
        return frozenset()
    nxt = layers[i + 1]
    plan = hook(StepInfo(at.block, at.step, nxt, at.kind), resident[nxt], slots)
    if plan is None:
        return frozenset()
    check_plan(plan, {}, resident[nxt], slots, who=f"prefetch, layer {nxt}")
    resident[nxt] = (resident[nxt] - plan.evict) | plan.fetch
    return plan.fetch


def check_trace_path(path: str | Path) -> Path:
    """A trace file name this install can write (.jsonl always; .parquet with pyarrow), else a ValueError saying so."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"trace file {path}: use a .jsonl or .parquet name")
    if path.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"trace file {path}: writing .parquet needs pyarrow (pip install pyarrow); .jsonl does not")
    return path
