"""The one benchmark harness: policies x budgets x regimes x repeats on identical prompts, one row per run.

Runs are interleaved (repeat, regime, budget, then every policy in turn) so drift in the machine touches
every policy alike. Each run starts from its policy's warm start, decodes one untimed warm-up prompt,
then the timed prompts. Rows are written after every run (atomic temp + rename), so an interrupted sweep
keeps what finished. Profiles (popularity, routing traces) come from built-in prompts, never the timed ones.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from tide.bench.bounds import oracle_bound_s
from tide.bench.hardware import stamp
from tide.calibrate import estimate
from tide.config import DecodeConfig
from tide.cost import CostModel
from tide.decode import Request
from tide.engine import Engine, load
from tide.evals.lossless import all_resident_fits, compare_logits, level, teacher_forced_logits, token_agreement
from tide.experts.host_kernels import kernel_name
from tide.experts.store import DeviceMemoryError
from tide.hub import atomic_write
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
           "moe_intermediate_size", "expert_bytes", "dtype", "device", "cpu_threads", "host_kernel",
           # the lossless contract (evals/lossless.py): level a or b, and level c's agreement with the ground truth
           "truth", "lossless_level", "identical_to_tier_matched", "token_agreement", "first_divergence",
           "logits_max_abs_diff", "top1_agreement", "peak_gpu_reserved_bytes", "error", "top1_flips", "top1_positions",
           "device_kernel",
           # batches (issue 22): requests per forward, whole-batch tokens/s above, per request here
           "batch_size", "requests", "tokens_per_s_per_request", "mb_h2d_per_token", "host_tokens_per_expert"]


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
    host_kernel: str = "auto"  # tide.experts.host_kernels
    device_kernel: str = "swiglu"  # tide.experts.executor: swiglu (levels a, b by construction) or grouped (c)
    batch_sizes: list[int] = field(default_factory=lambda: [1])  # requests per forward; 1 = one at a time


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
    frame = pd.DataFrame(rows, columns=COLUMNS + [c for c in rows[0] if c not in COLUMNS])
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def run_sweep(spec: SweepSpec, on_row: Callable[[dict], None] | None = None,
              on_warmup: Callable[[float], None] | None = None) -> tuple[list[dict], dict]:
    """Measure every (policy, budget, regime, repeat); return the rows and the run's context (traces, bounds).
    `on_warmup` gets the seconds of the first run's warm-up decode (before any timed decode), `on_row` each row."""
    spec.out.mkdir(parents=True, exist_ok=True)
    runs = variants(spec.policies)
    first_budget = spec.budgets[0]
    engine = load(spec.model, policy="lru", gpu_budget=first_budget, device=spec.device, dtype=spec.dtype,
                  cpu_threads=spec.cpu_threads, host_kernel=spec.host_kernel, device_kernel=spec.device_kernel)
    prompts = [engine.encode(p, spec.chat) for p in spec.prompts]
    hw = stamp(spec.device, spec.cpu_threads)
    cfg = engine.config
    shape = {"model": str(spec.model), "num_hidden_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
             "num_experts": cfg.num_experts, "moe_intermediate_size": cfg.moe_intermediate_size,
             "expert_bytes": engine.store.expert_bytes, "dtype": str(engine.store.dtype).removeprefix("torch."),
             "device": spec.device, "cpu_threads": spec.cpu_threads, "host_kernel": kernel_name(engine.host_kernel),
             "device_kernel": engine.device_kernel}
    truth, note = ground_truth(engine, [p for p, _, _ in runs])
    if note:
        print(f"note: {note}")
    runs = ordered_runs(runs, truth)
    profiles: dict[tuple[str, str, int], tuple] = {}  # (budget, regime, batch size) -> (popularity, trace)
    reference: dict[tuple[str, int], tuple[list[list[int]], list]] = {}  # truth tokens and probe logits
    traces: dict[tuple[str, str, str], RoutingTrace] = {}
    rows: list[dict] = []
    # every batch size decodes the same requests: the prompts, cycled up to the largest batch
    n_requests = max(len(prompts), max(spec.batch_sizes))
    if n_requests > len(prompts):
        print(f"note: {len(prompts)} prompts cycled to {n_requests} requests for batch size {max(spec.batch_sizes)}: "
              "copies of a prompt route alike, so the batch's union of experts is understated; give --prompts with "
              "at least as many distinct prompts as the largest batch (bench/prompts-batch.jsonl has 16)")
    prompts = [prompts[i % len(prompts)] for i in range(n_requests)]
    for rep in range(spec.repeat):
        for regime, batch in ((r, b) for r in spec.regimes for b in spec.batch_sizes):
            dcfg = dataclasses.replace(spec.decode, regime=regime)
            for budget in spec.budgets:
                if (budget, regime, batch) not in profiles:  # planned at the batch size it runs at
                    profiles[(budget, regime, batch)] = engine.profile_routing(budget, None, dataclasses.replace(
                        DecodeConfig(gen_length=64, block_length=dcfg.block_length, steps=dcfg.steps), regime=regime),
                        batch)
                popularity, ptrace = profiles[(budget, regime, batch)]
                for policy, label, options in runs:
                    if policy == "reference" and budget != first_budget:
                        continue  # one reference run per regime: it has no budget
                    options = {**spec.tide_options, **options} if policy == "tide" else options
                    if policy == "tide" and (options.get("refresh_interval", "auto") == "auto"
                                             or options.get("cost_fetch")):
                        options = {"refresh_interval": "auto", **options, "cost": spec.cost}
                    shown = "all" if policy == "reference" else budget
                    try:
                        engine.configure(policy, None if policy == "reference" else budget, popularity, trace=ptrace,
                                         **options)
                        row = measure(engine, prompts, dcfg, rep, label, shown, None if rows else on_warmup, batch)
                        interval = getattr(engine.executor.policy, "interval", None)  # before contract reconfigures
                        row["refresh_interval"] = json.dumps(sorted(set(interval.values()))) if interval else None
                        row.update(contract(engine, prompts, dcfg, row, reference, (regime, rep, batch), truth,
                                            policy, budget))
                    except (DeviceMemoryError, torch.OutOfMemoryError) as err:  # the sweep goes on
                        error = f"{type(err).__name__}: {err}".splitlines()[0]
                        row = {"policy": policy, "variant": label, "budget": shown, "regime": regime, "repeat": rep,
                               "batch_size": batch, "kind": "error", "error": error}
                        print(f"note: {label} at {shown} ({regime}) failed: {row['error']}")
                    else:
                        traces[(label, row["budget"], regime, batch)] = row.pop("_trace")
                    rows.append({**row, **shape, **hw})
                    write_csv(rows, spec.out / "bench.csv")
                    if on_row:
                        on_row(rows[-1])
    return rows, {"traces": traces, "profiles": profiles, "engine": engine, "truth": truth, "truth_note": note}


def ground_truth(engine: Engine, policies: list[str]) -> tuple[str | None, str | None]:
    """The run every other is compared with: reference when every expert fits the device, else full-offload
    (the same kernels on the same rows, so also exact). Returns it and a note when it is not the reference."""
    if "reference" in policies:
        fits, why = all_resident_fits(engine)
        if fits:
            return "reference", None
        return "full-offload", f"{why}: its runs are skipped and full-offload (exact) is the ground truth"
    if "full-offload" in policies:
        return "full-offload", "no reference run: full-offload (exact) is the ground truth"
    return None, "neither reference nor full-offload runs: outputs are not compared"


def ordered_runs(runs: list[tuple[str, str, dict]], truth: str | None) -> list[tuple[str, str, dict]]:
    """The ground truth first (added when it stands in for a reference that does not fit), reference dropped
    when it is not the truth and did not fit."""
    if truth is None:
        return runs
    keep = [r for r in runs if r[0] != "reference" or truth == "reference"]
    first = [r for r in keep if r[1] == truth] or [(truth, truth, {})]
    return first + [r for r in keep if r[1] != truth]


def contract(engine: Engine, prompts: list[list[int]], cfg: DecodeConfig, row: dict, reference: dict, key: tuple,
             truth: str | None, policy: str, budget: str) -> dict:
    """The three lossless levels for one measured run (evals/lossless.py); pops the run's tokens and host log."""
    tokens, host_log = row.pop("_tokens"), row.pop("_host_log")
    if policy == truth and key not in reference:
        probes = [teacher_forced_logits(engine, p, t, cfg.block_length) for p, t in zip(prompts, tokens, strict=True)]
        reference[key] = (tokens, probes)
    out = {"truth": truth, "lossless_level": level(row["pairs_cpu"], engine.device_kernel)}
    if key not in reference:
        return out
    truth_tokens, truth_probes = reference[key]
    agreement = [token_agreement(a, b) for a, b in zip(truth_tokens, tokens, strict=True)]
    firsts = [f for _, f in agreement if f is not None]
    logits = [compare_logits(t, teacher_forced_logits(engine, p, tt, cfg.block_length))
              for p, t, tt in zip(prompts, truth_probes, truth_tokens, strict=True)]
    flips, positions = sum(f for _, f, _ in logits), sum(n for _, _, n in logits)  # pooled over the prompts
    out.update(identical_to_reference=tokens == truth_tokens, first_divergence=min(firsts, default=None),
               token_agreement=sum(a for a, _ in agreement) / len(agreement),
               logits_max_abs_diff=max(d for d, _, _ in logits), top1_flips=flips, top1_positions=positions,
               top1_agreement=1 - flips / positions if positions else None)
    if row["pairs_cpu"]:  # replay the recorded host sets: same experts on the same tier (level b; reported at c)
        from tide.baselines.tier_matched import TierMismatch

        engine.configure("tier-matched", budget, host_log=host_log)
        try:
            out["identical_to_tier_matched"] = tokens == ([engine.generate(p, cfg).tokens for p in prompts]
                                                          if row["batch_size"] == 1 else
                                                          [g.tokens for g in engine.generate_batch(
                                                              [Request(p, cfg) for p in prompts], row["batch_size"])])
        except TierMismatch as err:  # the replay routed differently: the outputs were not the same
            out["identical_to_tier_matched"] = False
            print(f"note: {policy} at {budget}: {err}")
    return out


def measure(engine: Engine, prompts: list[list[int]], cfg: DecodeConfig, rep: int, label: str, budget: str,
            on_warmup: Callable[[float], None] | None = None, batch: int = 1) -> dict:
    started = time.perf_counter()
    engine.run(prompts[0], cfg)  # warm-up, not part of the row
    if on_warmup:
        on_warmup(time.perf_counter() - started)
    recording = hasattr(engine.executor, "host_log")  # the accelerate peer has no host tier
    if recording:
        engine.executor.host_log = []  # the host experts of every timed layer-forward, for the tier-matched replay
    result = engine.run_batch([Request(p, cfg) for p in prompts], batch, trace=True)
    s = result["stats"]
    total = {k: s[k] for k in ("generated_tokens", "seconds", "forwards", "bytes_h2d", "fetched_experts",
                               "streamed_experts", "pairs_gpu", "pairs_cpu", "cpu_experts", "fetch_s", "gpu_expert_s",
                               "cpu_expert_s", "moe_s", "non_expert_s")}
    host_log = engine.executor.host_log if recording else []
    if recording:
        engine.executor.host_log = None
    pairs = total["pairs_gpu"] + total["pairs_cpu"]
    tokens_per_s = total["generated_tokens"] / total["seconds"]
    return {"policy": label.partition("+")[0], "variant": label, "budget": budget,
            "slots_per_layer": engine.store.slots, "budget_bytes": engine.store.device_bytes, "regime": cfg.regime,
            "repeat": rep, "prompts": len(prompts), **total, "tokens_per_s": tokens_per_s,
            "batch_size": batch, "requests": len(prompts),
            "tokens_per_s_per_request": tokens_per_s / min(batch, len(prompts)),  # while the batch is full
            "mb_h2d_per_token": total["bytes_h2d"] / 1e6 / max(1, total["generated_tokens"]),
            "host_tokens_per_expert": total["pairs_cpu"] / total["cpu_experts"] if total["cpu_experts"] else None,
            "forwards_per_block": s["forwards_per_block"],
            "gpu_hit_ratio": total["pairs_gpu"] / pairs if pairs else 1.0,
            "peak_gpu_bytes": s["peak_gpu_bytes"] or None, "peak_gpu_reserved_bytes": s["peak_gpu_reserved_bytes"]
            or None, "kind": "measured", "_tokens": result["tokens"], "_trace": result["trace"], "_host_log": host_log}


def projections(rows: list[dict], context: dict, machines: list[str]) -> list[dict]:
    """Replay each run's routing trace through reference-machine cost models (modelled, labelled so)."""
    engine: Engine = context["engine"]
    cfg = engine.config
    out = []
    seen = set()
    for row in rows:
        key = (row["variant"], row["budget"], row["regime"], row.get("batch_size", 1))
        if row["repeat"] != 0 or key in seen or row["policy"] not in REPLAYABLE:
            continue
        seen.add(key)
        trace = context["traces"][key]
        for machine in machines:
            cost = estimate(machine, cfg.hidden_size, cfg.moe_intermediate_size, engine.store.dtype.itemsize)
            slots = row["slots_per_layer"]
            profile = context["profiles"].get((row["budget"], row["regime"], key[3]), (None, None))
            popularity = profile[0]
            ctx = PolicyContext(cfg.num_experts, tuple(cfg.moe_layers), slots, popularity)
            options = {}
            if row["policy"] == "tide":
                sol = solve_interval(profile[1], cost, slots,
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
                        "batch_size": key[3],
                        "generated_tokens": row["generated_tokens"], "expert_s": result.step_s,
                        "io_s": result.io_s, "cpu_s": result.cpu_s, "bytes_h2d": result.bytes_h2d,
                        "gpu_hit_ratio": result.gpu_hit_ratio, "oracle_s": bound,
                        "tokens_per_expert_s": row["generated_tokens"] / result.step_s if result.step_s else None,
                        "fraction_of_bound": bound / result.step_s if result.step_s else None,
                        "refresh_interval": options.get("refresh_interval"), "kind": f"modelled ({cost.source})"})
    return out


def engine_steps(trace: RoutingTrace) -> int:
    return max((r.step + 1 for r in trace.records if r.kind == "denoise"), default=1)
