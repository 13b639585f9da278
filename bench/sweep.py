"""The one benchmark harness: policies x budgets x regimes x repeats on identical prompts, one row per run.

Runs are interleaved (repeat, regime, budget, then every policy in turn) so drift in the machine touches
every policy alike. Each run starts from its policy's warm start, decodes one untimed warm-up prompt,
then the timed prompts. Rows are written after every run (atomic temp + rename), so an interrupted sweep
keeps what finished. Profiles (popularity, routing traces) come from built-in prompts, never the timed ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tide.bench.bounds import oracle_bound_s
from tide.bench.hardware import stamp
from tide.calibrate import estimate
from tide.config import DecodeConfig
from tide.cost import CostModel
from tide.engine import Engine, load
from tide.planner import solve_interval
from tide.policy import PolicyContext, make_policy
from tide.trace import RoutingTrace, replay

BASELINES = ("full-offload", "lru", "cpu-fallback", "accelerate")
REPLAYABLE = ("reference", "full-offload", "lru", "cpu-fallback", "tide")  # accelerate has no plans to replay
# Column order of bench.csv: the schema the CI check asserts.
COLUMNS = ["policy", "variant", "budget", "slots_per_layer", "budget_bytes", "regime", "repeat", "prompts",
           "generated_tokens", "seconds", "tokens_per_s", "forwards", "forwards_per_block", "bytes_h2d",
           "fetched_experts", "streamed_experts", "pairs_gpu", "pairs_cpu", "gpu_hit_ratio", "fetch_s",
           "gpu_expert_s", "cpu_expert_s", "moe_s", "non_expert_s", "peak_gpu_bytes", "identical_to_reference",
           "refresh_interval", "kind", "model", "num_hidden_layers", "hidden_size", "num_experts",
           "moe_intermediate_size", "expert_bytes", "dtype", "device", "cpu_threads"]


@dataclass
class SweepSpec:
    model: str
    policies: list[str]
    budgets: list[str]
    regimes: list[str]
    prompts: list[str]
    decode: DecodeConfig
    device: str = "cpu"
    dtype: str | None = None
    cpu_threads: int = 1
    repeat: int = 2
    cost: CostModel | None = None  # for tide's planner (refresh_interval auto) and --cost-fetch variants
    out: Path = Path("results/bench")
    tide_options: dict = field(default_factory=dict)
    chat: bool = False  # prompts wrapped in the tokenizer's chat template


def variants(policies: list[str]) -> list[tuple[str, str, dict]]:
    """(policy, variant label, options): tide+interval, +costfetch, +perlayer, +prefetch are flags on tide."""
    flags = {"interval": {"rank": "interval"}, "costfetch": {"cost_fetch": True},
             "perlayer": {"per_layer_interval": True}, "prefetch": {"prefetch_next": True}}
    out = []
    for name in policies:
        base, _, flag = name.partition("+")
        if flag and (base != "tide" or flag not in flags):
            raise ValueError(f"unknown policy variant {name!r}; tide takes +interval, +costfetch, +perlayer, "
                             "+prefetch")
        out.append((base, name, dict(flags.get(flag, {}))))
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame(rows, columns=COLUMNS + [c for c in rows[0] if c not in COLUMNS]).to_csv(tmp, index=False)
    os.replace(tmp, path)


def run_sweep(spec: SweepSpec, on_row: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Measure every (policy, budget, regime, repeat); return the rows and the run's context (traces, bounds)."""
    spec.out.mkdir(parents=True, exist_ok=True)
    runs = variants(spec.policies)
    first_budget = spec.budgets[0]
    engine = load(spec.model, policy="lru", gpu_budget=first_budget, device=spec.device, dtype=spec.dtype,
                  cpu_threads=spec.cpu_threads)
    prompts = [engine.encode(p, spec.chat) for p in spec.prompts]
    hw = stamp(spec.device, spec.cpu_threads)
    cfg = engine.config
    shape = {"model": str(spec.model), "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
             "num_experts": cfg.num_experts, "moe_intermediate_size": cfg.moe_intermediate_size,
             "expert_bytes": engine.store.expert_bytes, "dtype": str(engine.store.dtype).removeprefix("torch."),
             "device": spec.device, "cpu_threads": spec.cpu_threads}
    profiles: dict[tuple[str, str], tuple] = {}
    reference: dict[tuple[str, int], list[list[int]]] = {}
    traces: dict[tuple[str, str, str], RoutingTrace] = {}
    rows: list[dict] = []
    for rep in range(spec.repeat):
        for regime in spec.regimes:
            dcfg = dataclasses.replace(spec.decode, regime=regime)
            for budget in spec.budgets:
                if (budget, regime) not in profiles:
                    profiles[(budget, regime)] = engine.profile_routing(budget, None, dataclasses.replace(
                        DecodeConfig(gen_length=64, block_length=dcfg.block_length, steps=dcfg.steps), regime=regime))
                popularity, ptrace = profiles[(budget, regime)]
                for policy, label, options in runs:
                    if policy == "reference" and budget != first_budget:
                        continue  # one reference run per regime: it has no budget
                    options = {**spec.tide_options, **options} if policy == "tide" else options
                    if policy == "tide" and (options.get("refresh_interval", "auto") == "auto"
                                             or options.get("cost_fetch")):
                        options = {"refresh_interval": "auto", **options, "cost": spec.cost}
                    engine.configure(policy, None if policy == "reference" else budget, popularity, trace=ptrace,
                                     **options)
                    row = measure(engine, prompts, dcfg, rep, label, "all" if policy == "reference" else budget)
                    interval = getattr(engine.executor.policy, "interval", None)
                    row["refresh_interval"] = json.dumps(sorted(set(interval.values()))) if interval else None
                    key = (regime, rep)
                    tokens = row.pop("_tokens")
                    if policy == "reference":
                        reference[key] = tokens
                    row["identical_to_reference"] = tokens == reference[key] if key in reference else None
                    traces[(label, row["budget"], regime)] = row.pop("_trace")
                    rows.append({**row, **shape, **hw})
                    write_csv(rows, spec.out / "bench.csv")
                    if on_row:
                        on_row(rows[-1])
    return rows, {"traces": traces, "profiles": profiles, "engine": engine}


def measure(engine: Engine, prompts: list[list[int]], cfg: DecodeConfig, rep: int, label: str, budget: str) -> dict:
    engine.run(prompts[0], cfg)  # untimed warm-up
    total: dict[str, float] = {}
    tokens, trace = [], RoutingTrace(engine.config.num_experts, engine.config.moe_layers)
    peak = 0
    blocks = 0
    for p in prompts:
        result = engine.run(p, cfg, trace=True)
        tokens.append(result["tokens"])
        trace.records += result["trace"].records
        s = result["stats"]
        blocks += len(s["steps_per_block"])
        peak = max(peak, s["peak_gpu_bytes"] or 0)
        for k in ("generated_tokens", "seconds", "forwards", "bytes_h2d", "fetched_experts", "streamed_experts",
                  "pairs_gpu", "pairs_cpu", "fetch_s", "gpu_expert_s", "cpu_expert_s", "moe_s", "non_expert_s"):
            total[k] = total.get(k, 0) + s[k]
    pairs = total["pairs_gpu"] + total["pairs_cpu"]
    return {"policy": label.partition("+")[0], "variant": label, "budget": budget,
            "slots_per_layer": engine.store.slots, "budget_bytes": engine.store.device_bytes, "regime": cfg.regime,
            "repeat": rep, "prompts": len(prompts), **total,
            "tokens_per_s": total["generated_tokens"] / total["seconds"],
            "forwards_per_block": total["forwards"] / max(1, blocks),
            "gpu_hit_ratio": total["pairs_gpu"] / pairs if pairs else 1.0,
            "peak_gpu_bytes": peak or None, "kind": "measured", "_tokens": tokens, "_trace": trace}


def projections(rows: list[dict], context: dict, machines: list[str]) -> list[dict]:
    """Replay each run's routing trace through reference-machine cost models (modelled, labelled so)."""
    engine: Engine = context["engine"]
    cfg = engine.config
    out = []
    seen = set()
    for row in rows:
        key = (row["variant"], row["budget"], row["regime"])
        if row["repeat"] != 0 or key in seen or row["policy"] not in REPLAYABLE:
            continue
        seen.add(key)
        trace = context["traces"][key]
        for machine in machines:
            cost = estimate(machine, cfg.hidden_size, cfg.moe_intermediate_size, engine.store.dtype.itemsize)
            slots = row["slots_per_layer"]
            popularity = context["profiles"].get((row["budget"], row["regime"]), (None, None))[0]
            ctx = PolicyContext(cfg.num_experts, tuple(cfg.moe_layers), slots, popularity)
            options = {}
            if row["policy"] == "tide":
                sol = solve_interval(context["profiles"][(row["budget"], row["regime"])][1], cost, slots,
                                     max(1, engine_steps(trace)))
                options = {"refresh_interval": sol.interval, **({"rank": "interval"} if "interval" in row["variant"]
                                                                 else {}),
                           **({"prefetch_next": True} if "prefetch" in row["variant"] else {})}
                if "costfetch" in row["variant"]:
                    options.update(cost=cost, cost_fetch=True)
            result = replay(trace, make_policy(row["policy"], ctx, **options), slots, cost)
            bound = oracle_bound_s(trace, slots, cost)
            out.append({"machine": machine, "policy": row["policy"], "variant": row["variant"],
                        "budget": row["budget"], "slots_per_layer": slots, "regime": row["regime"],
                        "generated_tokens": row["generated_tokens"], "expert_s": result.step_s,
                        "io_s": result.io_s, "cpu_s": result.cpu_s, "bytes_h2d": result.bytes_h2d,
                        "gpu_hit_ratio": result.gpu_hit_ratio, "oracle_s": bound,
                        "tokens_per_expert_s": row["generated_tokens"] / result.step_s if result.step_s else None,
                        "fraction_of_bound": bound / result.step_s if result.step_s else None,
                        "refresh_interval": options.get("refresh_interval"), "kind": f"modelled ({cost.source})"})
    return out


def engine_steps(trace: RoutingTrace) -> int:
    return max((r.step + 1 for r in trace.records if r.kind == "denoise"), default=1)
