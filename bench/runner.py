"""`tide bench` end to end: resolve inputs, print the card, sweep, project, report, check.

Owns the run directory (results/<date>-<host>-<model>/: bench.csv, projections.csv, bench.md, bench.png,
env.json) and the card printed before measuring. The measuring itself is bench/sweep.py.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from tide.bench import report
from tide.bench.bounds import oracle_bound_s
from tide.bench.check import bytes_report
from tide.bench.check import check as run_checks
from tide.bench.sweep import SweepSpec, projections, run_sweep, variants
from tide.budget import BudgetSizes, slots_per_layer
from tide.calibrate import REFERENCE_MACHINES, load_or_calibrate
from tide.config import REGIMES, DecodeConfig, ModelConfig, parse_refresh_interval, usable_cores
from tide.cost import CostModel
from tide.engine import torch_dtype
from tide.experts.host_kernels import host_kernel as choose_host_kernel
from tide.hub import atomic_write, new_run_dir, resolve_model
from tide.policy import load_registered

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts.jsonl"


def read_prompts(path: str | None) -> list[str]:
    """Prompts from a JSONL file: one JSON string per line (code prompts keep their blank lines)."""
    path = Path(path or DEFAULT_PROMPTS)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read the prompts file ({err.strerror})") from None
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg}); write one JSON string per line") from None
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{n}: expected a non-empty JSON string, got {type(prompt).__name__}")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts (one JSON string per line)")
    return prompts


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_bench(model_dir, policies, budgets, regimes, prompts_path, gen_length, block_length, steps, threshold,
              device, dtype, cpu_threads, repeat, profile_path, refresh_interval, machines, out, check,
              command: str, chat: bool = False, layers: int | None = None, host_kernel: str = "auto",
              device_kernel: str = "swiglu", batch_sizes: str = "1") -> dict:
    import tide.baselines  # noqa: F401  (registers the baseline policies)
    import tide.refresh  # noqa: F401

    notes: list[str] = []
    model = resolve_model(model_dir, notes, layers=layers)
    for note in notes:
        print(f"note: {note}")
    cfg = ModelConfig.from_json(model / "config.json")
    # every option is checked before anything is measured or any run directory exists
    policy_list, budget_list, regime_list = (_csv(x) for x in (policies, budgets, regimes))
    for flag, given in (("--policies", policy_list), ("--budgets", budget_list)):
        if not given:
            raise ValueError(f"{flag}: give at least one (comma-separated)")
    for base, _, _ in variants(policy_list):
        if base not in load_registered():
            raise ValueError(f"--policies: unknown policy {base!r}; registered: {sorted(load_registered())}")
    sizes = BudgetSizes(cfg.num_experts, len(cfg.moe_layers), 3 * cfg.moe_intermediate_size * cfg.hidden_size, 0, 0)
    for budget in budget_list:
        slots_per_layer(budget, sizes)  # a ValueError naming the budget
    batch_list = parse_batch_sizes(batch_sizes)
    bad = [r for r in regime_list if r not in REGIMES]
    if bad or not regime_list:
        raise ValueError(f"--regime {regimes!r}: choose from {', '.join(REGIMES)}")
    unknown = [m for m in _csv(machines) if m not in REFERENCE_MACHINES]
    if unknown:
        raise ValueError(f"--projections {unknown}: known reference machines are {sorted(REFERENCE_MACHINES)}")
    decode = DecodeConfig(gen_length=gen_length, block_length=block_length, steps=steps, threshold=threshold)
    tide_options = {} if refresh_interval == "auto" else {"refresh_interval": parse_refresh_interval(refresh_interval)}
    prompts = read_prompts(prompts_path)
    if profile_path:
        CostModel.from_json(profile_path)
    _, kernel_note = choose_host_kernel(host_kernel, torch_dtype(dtype, cfg), cfg.hidden_size,
                                        cfg.moe_intermediate_size)  # a named kernel that cannot run here: ValueError
    run_dir = new_run_dir(out, model.name)
    if not profile_path:
        print("note: no --profile given; calibrating this machine (a few seconds)")
    cost = load_or_calibrate(profile_path, cfg.hidden_size, cfg.moe_intermediate_size, torch_dtype(dtype, cfg),
                             device, cpu_threads, host_kernel)
    spec = SweepSpec(str(model), policy_list, budget_list, regime_list, prompts, decode, device, dtype, cpu_threads,
                     repeat, cost, run_dir, tide_options, chat, host_kernel, device_kernel, batch_list)
    card = card_lines(spec, cfg, cost) + [f"host kernel: {kernel_note}; device kernel: {device_kernel}" + (
        " (grouped GEMMs: every run is held to lossless level c)" if device_kernel == "grouped" else "")]
    for line in card:
        print(f"card: {line}")
    per_rep = sum(1 for p, _, _ in variants(policy_list) for _ in (budget_list if p != "reference" else [0]))
    total = per_rep * len(regime_list) * len(batch_list) * repeat
    n_requests = max(len(spec.prompts), max(batch_list))
    print(f"bench: {total} runs ({per_rep} per regime, batch size and repeat), each a warm-up and {n_requests} timed "
          f"request(s)")
    bar = tqdm(total=total, desc="bench runs", unit="run")
    started = time.perf_counter()

    def on_warmup(decode_s: float) -> None:  # before the first timed decode: a rough figure, said so
        per_run = decode_s * (1 + n_requests)
        bar.write(f"bench: decoding alone, about {total} runs x {per_run:.0f} s = {total * per_run / 60:.1f} min (from "
                  f"the first warm-up decode, {decode_s:.1f} s); profiling and the lossless checks add to it")

    def on_row(r: dict) -> None:
        if bar.n == 0:
            first_s = time.perf_counter() - started  # the first run, its policy profiling included
            bar.write(f"bench: the first run took {first_s:.0f} s: expected about {total} runs x {first_s:.0f} s = "
                      f"{total * first_s / 60:.1f} min")
        bar.update(1)
        bar.set_postfix_str(f"{r['variant']} {r['budget']} {r['regime']}: {r.get('tokens_per_s', 0):.1f} tok/s")

    try:
        rows, context = run_sweep(spec, on_row=on_row, on_warmup=on_warmup)
    finally:
        bar.close()
    bench_df = pd.read_csv(run_dir / "bench.csv")
    machine_list = _csv(machines)
    proj = pd.DataFrame(projections(rows, context, machine_list)) if machine_list else None
    if proj is not None and len(proj):
        atomic_write(run_dir / "projections.csv", lambda tmp: proj.to_csv(tmp, index=False))
    card.append(oracle_line(context, cost))
    if context["truth_note"]:
        card.append(f"ground truth: {context['truth_note']}")
    if "accelerate" in policy_list:
        card.append("accelerate is measured as accelerate runs it: its hooks copy each offloaded expert per call and "
                    "empty the CUDA cache on every load (allocator churn counts against it)")
    atomic_write(run_dir / "bench.md", report.markdown(bench_df, proj, card, command))
    atomic_write(run_dir / "bench.png", lambda tmp: report.plot(bench_df, tmp, proj))
    env = {"command": command, "model": str(model), "spec": {k: str(v) for k, v in vars(spec).items() if k != "cost"},
           "machine": {k.removeprefix("hw_"): v for k, v in rows[0].items() if k.startswith("hw_")},
           "cost_model": {"source": cost.source, "fetch_s": cost.fetch_s(), "h2d_GBps": cost.h2d_bytes_per_s / 1e9}}
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2))
    print(f"\nMeasured on this machine, median of {repeat} repeat(s); every column, the card and the modelled "
          f"projections: {run_dir / 'bench.md'}\n")
    print(report.compact(bench_df))
    for line in report.losses(report.summarise(bench_df)) or ["- no baseline beats tide in this run"]:
        print(line)

    def key(r: dict) -> str:
        batch = f"|batch {r['batch_size']}" if len(batch_list) > 1 else ""
        return f"{r['variant']}|{r['budget']}|{r['regime']}{batch}"

    summary = {"out": str(run_dir), "rows": len(rows), "kind": "measured",
               "tokens_per_s": {key(r): round(r["tokens_per_s"], 3)
                                for r in rows if r["repeat"] == 0 and r.get("kind") != "error"}}
    if check:
        summary["failures"] = run_checks(bench_df, context, cost)
        for line in bytes_report(bench_df):
            print(f"bytes host->device (reported, not checked): {line}")
        for failure in summary["failures"]:
            print(f"CHECK FAILED: {failure}")
        print("bench checks: " + ("all hold" if not summary["failures"] else f"{len(summary['failures'])} failed"))
    return summary


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in _csv(text)]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes {text!r}: give positive integers, comma-separated (e.g. 1,4,16)")
    return list(dict.fromkeys(sizes))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def card_lines(spec: SweepSpec, cfg: ModelConfig, cost) -> list[str]:
    from tide.budget import BudgetSizes

    eb = cost.expert_bytes
    sizes = BudgetSizes(cfg.num_experts, len(cfg.moe_layers), eb, 0, 2)
    slots = {b: slots_per_layer(b, sizes) for b in spec.budgets}
    return [f"model {spec.model}: {cfg.num_hidden_layers} layers ({len(cfg.moe_layers)} MoE), hidden "
            f"{cfg.hidden_size}, {cfg.num_experts} experts x {cfg.moe_intermediate_size}, "
            f"top-{cfg.num_experts_per_tok}",
            f"expert bytes {eb} ({cost.shape.get('dtype')}); slots per layer by budget: {slots}",
            f"cost model ({cost.source}): H2D {cost.h2d_bytes_per_s / 1e9:.2f} GB/s, fetch {cost.fetch_s() * 1e6:.1f} "
            f"us/expert; CPU expert {cost.cpu_s(1) * 1e6:.1f} us at 1 token, {cost.cpu_s(32) * 1e6:.1f} us at 32",
            f"decode: gen_length {spec.decode.gen_length}, block {spec.decode.block_length}, steps "
            f"{spec.decode.steps}, threshold {spec.decode.threshold}; {len(spec.prompts)} prompts; regimes "
            f"{spec.regimes}; device {spec.device}",
            f"threads: {torch_threads()} intra-op on the main thread, {spec.cpu_threads} host-expert worker(s), "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, {usable_cores()} usable cores"]


def oracle_line(context: dict, cost) -> str:
    parts = []
    engine = context["engine"]
    for (budget, regime, batch), (_, trace) in context["profiles"].items():
        forwards = len({(r.block, r.step, r.kind) for r in trace.records}) or 1
        slots = slots_per_layer(budget, engine.budget_sizes())
        shown = f"{budget}/{regime}" + (f"/batch {batch}" if batch > 1 else "")
        parts.append(f"{shown}: {oracle_bound_s(trace, slots, cost) / forwards * 1e3:.3f} ms")
    return "oracle expert-path bound per forward on this machine's cost model (profiling trace): " + "; ".join(parts)
