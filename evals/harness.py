"""`tide eval`: lm-eval tasks under every policy x budget x regime, through one engine, with the losslessness verdict.

The checkpoint is loaded once; each run re-configures the engine (`Engine.configure`, which frees the previous
device tier) and hands lm-eval a fresh `TideLM` over it. The comparison policy (`against`) runs first in each
regime: `reference` (all experts resident) when its expert memory fits the device, else `full-offload` (the same
kernels on the same rows, so also exact); the output says which and why. Per run and task, eval.csv holds the
metric with its stderr, the throughput of that very run (generated tokens/s, forwards, MB host->device, GPU hit
ratio) and the fraction of samples whose output (token ids, or the log-likelihood value) equals the comparison
run's; requests.csv holds every request's tokens, seconds, forwards and traffic. A run whose outputs or scores
differ is flagged LOSSY. Files are rewritten after every run (temp + rename),
so an interrupted evaluation keeps the runs that finished; lm-eval's own results and samples files are written
by its EvaluationTracker under lm_eval/<run>/.

Data parallel (`--nproc N`, or started by torchrun / accelerate launch: evals/distributed.py): every rank loads
its engine on its own device and runs the same sequence of runs; lm-eval shards each run's requests by rank and
gathers its metrics and samples to rank 0; the harness gathers the per-request records (outputs, stats, rank) and
rank 0 alone compares, writes and prints. Throughput: tokens/s of the whole run is its tokens over the slowest
rank's seconds, beside each rank's own.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tide.config import DecodeConfig
from tide.evals.distributed import ONE, Group, all_gather_object, join, rank_device, shared_master

TASK_DIR = Path(__file__).resolve().parent / "tasks"
OUR_TASKS = ("tide_arith", "tide_arith_mc", "tide_humaneval", "tide_mbpp_sanitized")
DEFAULT_TASKS = ("tide_arith", "tide_arith_mc")
DEFAULT_POLICIES = ("reference", "full-offload", "lru", "cpu-fallback", "tide")
EXACT = ("reference", "full-offload")  # comparison policies: both compute every expert on the device tier
WARMUP = DecodeConfig(gen_length=32, block_length=32, steps=8)


@dataclass
class EvalSpec:
    model: str | None = None
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    budgets: list[str] = field(default_factory=lambda: ["25%"])
    regimes: list[str] = field(default_factory=lambda: ["block-kv"])
    against: str = "auto"  # reference | full-offload | auto
    decode: dict[str, Any] = field(default_factory=dict)  # TideLM decode model_args that govern (given flags only)
    apply_chat_template: bool = False
    log_samples: bool = False
    limit: int | None = None
    include_path: str | None = None
    offline: bool = False
    data: str | None = None  # local MBPP sanitized file
    mc_samples: int | None = None
    seed: int = 0
    batch_size: int = 1  # generation requests per forward (TideLM's batch_size)
    shm_dir: str | None = None  # where the local ranks share one host master (evals/distributed.py)
    device: str = "cpu"
    dtype: str | None = None
    cpu_threads: int = 1
    refresh_interval: int | str = 4
    profile: str | None = None
    confirm_unsafe_code: bool = False
    out: str | None = None
    out_claimed: bool = False  # `out` is a run directory the caller already claimed (tide reproduce)
    command: str = ""


# ---- tasks -----------------------------------------------------------------------------------------------
def task_manager(include_path: str | None = None, data: str | None = None):
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, include_defaults=True, metadata={"mbpp_data": data} if data else None)


def check_tasks(manager, names: list[str]) -> None:
    """Unknown names and datasets that cannot be loaded, each as one sentence, before any model is loaded."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task {name!r}: TIDE's tasks are {', '.join(OUR_TASKS)}; lm-eval knows "
                             f"{len(known)} more tasks and groups (`lm-eval ls tasks`){hint}")
    try:
        manager.load(names)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"tasks {names}: {err}") from None
    except Exception as err:  # datasets raise many types (offline mode, HTTP, missing configs)
        raise ValueError(f"tasks {names}: a dataset could not be loaded ({type(err).__name__}: {err}); without "
                         "the hub it must already be in the Hugging Face cache (HF_HOME)") from None


# ---- runs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    policy: str
    budget: str  # "all" for reference
    regime: str

    @property
    def slug(self) -> str:
        return f"{self.policy}-{self.budget.replace('/', 'per').replace('%', 'pct')}-{self.regime}"


def plan_runs(spec: EvalSpec, against: str) -> list[Run]:
    """The comparison run first in each regime, then every policy at every budget (reference once: no budget)."""
    runs = []
    for regime in spec.regimes:
        first = Run(against, "all" if against == "reference" else spec.budgets[0], regime)
        runs.append(first)
        for budget in spec.budgets:
            for policy in spec.policies:
                run = Run(policy, "all" if policy == "reference" else budget, regime)
                if run not in runs:
                    runs.append(run)
    return runs


def choose_against(spec: EvalSpec, fits: bool, why: str) -> tuple[str, str]:
    """(policy, why): the exact comparison the evaluation is measured against, given whether the reference fits."""
    if spec.against != "auto":
        if spec.against not in EXACT:
            raise ValueError(f"--against {spec.against!r}: choose reference, full-offload or auto")
        if spec.against == "reference" and not fits:
            raise ValueError(f"--against reference: {why}; use --against full-offload")
        return spec.against, f"chosen with --against ({why})"
    return ("reference", why) if fits else ("full-offload", why + ", so full-offload (same kernels, same rows) is "
                                            "the exact comparison")


def check_spec(spec: EvalSpec) -> None:
    """Refuse unknown policies and regimes before any run directory exists or any model loads."""
    import tide.baselines  # noqa: F401  (registers the baseline policies)
    import tide.refresh  # noqa: F401
    from tide.config import REGIMES
    from tide.policy import load_registered

    unknown = [p for p in spec.policies if p.split("+")[0] not in load_registered()]
    if unknown or not spec.policies:
        raise ValueError(f"--policies {', '.join(unknown) or '(none)'}: choose from "
                         f"{', '.join(sorted(load_registered()))}")
    bad = [r for r in spec.regimes if r not in REGIMES]
    if bad or not spec.regimes:
        raise ValueError(f"--regimes {', '.join(bad) or '(none)'}: choose from {', '.join(REGIMES)}")


def run_eval(spec: EvalSpec, on_run=None) -> tuple[dict[str, Any], list[dict], dict[str, Any]]:
    """Everything `tide eval` does; returns the summary (run directory, rows, LOSSY runs), the rows, the header."""
    import tide.baselines  # noqa: F401  (registers the baseline policies)
    import tide.refresh  # noqa: F401
    from tide.engine import load
    from tide.evals.lossless import all_resident_fits
    from tide.hub import new_run_dir, resolve_model

    check_spec(spec)
    if spec.offline or all(t in OUR_TASKS for t in spec.tasks):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    notes: list[str] = []
    model = resolve_model(spec.model, notes)
    manager = task_manager(spec.include_path, spec.data)
    check_tasks(manager, spec.tasks)
    group = join(spec.device)
    lead = group.rank == 0  # the one rank that writes
    run_dir = None if not lead else Path(spec.out) if spec.out_claimed else new_run_dir(spec.out, "eval")
    engine = load(model, policy="full-offload", gpu_budget=spec.budgets[0], device=rank_device(spec.device, group),
                  dtype=spec.dtype, cpu_threads=spec.cpu_threads,
                  host_master=shared_master(group, model, spec.dtype, spec.shm_dir))
    notes += engine.notes
    fits, why = all_resident_fits(engine)
    against, why = choose_against(spec, fits, why)
    runs = plan_runs(spec, against)
    if "reference" in spec.policies and not fits:
        runs = [r for r in runs if r.policy != "reference"]
        notes.append(f"reference skipped: {why}")
    header = run_header(spec, model, against, why, notes, group.world_size)
    comparison: dict[str, dict] = {}  # regime -> outputs of the comparison run
    against_rows: dict[str, dict] = {}  # regime -> its rows, by (task, metric)
    table: list[dict] = []
    requests: list[dict] = []  # one row per request of every run (requests.csv)
    for run in runs:
        lm = evaluate_run(spec, engine, run, manager, model, run_dir if lead else None, group)
        if not lead:
            continue
        if getattr(lm, "tier_note", None):
            notes.append(f"{run.slug}: {lm.tier_note}")  # header["notes"] is this list
        outputs = outputs_of(lm)
        first = run.regime not in comparison  # plan_runs puts the comparison run first in each regime
        if first:
            comparison[run.regime] = outputs
        new = rows(run, lm, comparison[run.regime], against, first, against_rows.get(run.regime))
        if first:
            against_rows[run.regime] = {(r["task"], r["metric"]): r for r in new}
        table += new
        requests += [{"policy": run.policy, "budget": run.budget, "regime": run.regime, "task": x["task"],
                      "doc_id": x["doc_id"], "idx": x["idx"], "kind": x["kind"], "rank": x.get("rank", 0),
                      **x["stats"]} for x in lm.records]
        write(table, requests, header, run_dir)
        if on_run:
            on_run(run, table)
        del lm
    engine.executor.close()
    lossy = sorted({f"{r['policy']}@{r['budget']}/{r['regime']}" for r in table if r["lossless"] is False})
    summary = {"out": str(run_dir) if lead else None, "rows": len(table), "against": against, "lossy": lossy}
    return {**summary, "rank": group.rank, "ranks": group.world_size}, table, header


def evaluate_run(spec: EvalSpec, engine, run: Run, manager, model: Path, run_dir: Path | None,
                 group: Group = ONE):
    """One lm-eval pass of `run` over the shared engine; lm-eval's results (and samples) under lm_eval/<run>/.
    Under several ranks, rank 0 gets every rank's records (the others return theirs: they write nothing)."""


    options: dict[str, Any] = {}
    if run.policy == "tide":
        options = {"refresh_interval": spec.refresh_interval}
        if spec.refresh_interval == "auto":
            from tide.calibrate import load_or_calibrate

            cfg = engine.config
            options["cost"] = load_or_calibrate(spec.profile, cfg.hidden_size, cfg.moe_intermediate_size,
                                                engine.store.dtype, spec.device, spec.cpu_threads)
    budget = None if run.budget == "all" else run.budget
    engine.configure(run.policy, budget, profile_batch=spec.batch_size, **options)
    engine.run(engine.encode("warm-up"), WARMUP)  # untimed, as in tide bench: first-call costs stay out of tok/s
    recording = hasattr(engine.executor, "host_log")  # the accelerate peer has no host tier
    if recording:
        engine.executor.host_log = []  # every layer-forward's host experts, for the tier-matched replay
    lm, results = lm_eval_pass(spec, engine, run, manager, model,
                               str(run_dir / "lm_eval" / run.slug) if run_dir else None, group, logged=True)
    host_log = engine.executor.host_log if recording else []
    if recording:
        engine.executor.host_log = None
    lm.results, lm.tier_matched = (results or {}).get("results"), None
    if any(group_any(group, any(cpu for _, cpu in host_log))):  # level b: the same requests with the same host
        from tide.baselines.tier_matched import TierMismatch  # sets, every other expert on the device tier

        engine.configure("tier-matched", budget or spec.budgets[0], host_log=host_log)
        try:
            lm.tier_matched = outputs_of(lm_eval_pass(spec, engine, run, manager, model, None, group)[0])
        except TierMismatch as err:  # outputs differ so much that the routing did: no sample can match
            lm.tier_matched, lm.tier_note = {}, str(err)
    return lm


def lm_eval_pass(spec: EvalSpec, engine, run: Run, manager, model: Path, output_path: str | None,
                 group: Group = ONE, logged: bool = False):
    """lm-eval's simple_evaluate over the engine as configured; its results (and samples) under output_path. Under
    several ranks lm-eval's results are rank 0's (None elsewhere), and rank 0's lm holds every rank's records.
    `logged`: this pass logs samples (with --log-samples), the same on every rank, whatever writes them: lm-eval
    gathers the samples only where it logs them, and ranks that differ would pair different collectives."""
    from lm_eval import simple_evaluate
    from lm_eval.loggers import EvaluationTracker

    from tide.evals.lm_eval_model import TideLM

    extra = {"mc_samples": spec.mc_samples} if spec.mc_samples else {}
    lm = TideLM(str(model), policy=run.policy, engine=engine, decode_from="model", seed=spec.seed,
                batch_size=spec.batch_size, group=group, **{**spec.decode, "regime": run.regime}, **extra)
    tracker = EvaluationTracker(output_path=output_path) if output_path else None
    results = simple_evaluate(model=lm, model_args=f"pretrained={model.name},policy={run.policy},"
                              f"gpu_budget={run.budget},regime={run.regime}", tasks=list(spec.tasks),
                              task_manager=manager, limit=spec.limit, log_samples=bool(spec.log_samples and logged),
                              evaluation_tracker=tracker, apply_chat_template=spec.apply_chat_template,
                              confirm_run_unsafe_code=spec.confirm_unsafe_code, bootstrap_iters=1000,
                              random_seed=spec.seed, numpy_random_seed=spec.seed, torch_random_seed=spec.seed,
                              fewshot_random_seed=spec.seed)
    if group.active:
        lm.records = merge_records(lm.gather_object([{**x, "rank": group.rank} for x in lm.records]))
    if results is None:  # not rank 0
        return lm, None
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in results.get("configs", {}) if samples else ():
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return lm, results


def merge_records(parts: list[list[dict]] | None) -> list[dict]:
    """Every rank's records (rank 0; [] elsewhere), in (task, doc, idx, kind) order, once each: lm-eval pads a
    rank short of requests with copies of its last one, whose outputs are the same."""
    seen: dict[tuple, dict] = {}
    for rec in (r for part in parts or [] for r in part):
        seen.setdefault((rec["task"], rec["doc_id"], rec["idx"], rec["kind"]), rec)
    return [seen[k] for k in sorted(seen, key=lambda k: (str(k[0]), k[1] if k[1] is not None else -1, k[2], k[3]))]


def group_any(group: Group, flag: bool) -> list[bool]:
    """`flag` of every rank (so every rank takes the same branch and runs the same collectives)."""
    return all_gather_object(flag, group)


def outputs_of(lm) -> dict[tuple, Any]:
    return {(x["task"], x["doc_id"], x["idx"]): x["output"] for x in lm.records}


def rows(run: Run, lm, against_outputs: dict[tuple, Any], against: str, is_comparison: bool = False,
         against_rows: dict[tuple, dict] | None = None) -> list[dict]:
    """One row per (task, metric) of one run: value, stderr, throughput, and the three lossless levels
    (evals/lossless.py) against the comparison run and, for a host-tier run, its tier-matched replay."""
    from tide.evals.lossless import TOLERANCE, relative_difference, token_agreement

    mine = outputs_of(lm)
    out = []
    for task, metrics in lm.results.items():
        recs = [x for x in lm.records if x["task"] == task]
        keys = [k for k in mine if k[0] == task]
        same = [k in against_outputs and mine[k] == against_outputs[k] for k in keys]
        pairs = [(against_outputs[k], mine[k]) for k in keys if k in against_outputs]
        agree = [token_agreement(a, b)[0] for a, b in pairs if isinstance(a, list)]
        ll = [relative_difference(a[0], b[0]) for a, b in pairs if isinstance(a, tuple)]
        tier = lm.tier_matched
        tier_same = [tier.get(k) == mine[k] for k in keys] if tier is not None else []
        gen = [x["stats"] for x in recs if x["kind"] == "generate"]
        ranks = sorted({x.get("rank", 0) for x in recs})  # in parallel: the run lasts as long as its slowest rank
        tokens = sum(s["generated_tokens"] for s in gen)
        by_rank = {r: [x["stats"] for x in recs if x["kind"] == "generate" and x.get("rank", 0) == r] for r in ranks}
        rank_s = {r: sum(s["seconds"] for s in v) for r, v in by_rank.items()}
        seconds = max(rank_s.values(), default=0.0)
        rank_rate = [sum(s["generated_tokens"] for s in by_rank[r]) / t for r, t in rank_s.items() if t > 0]
        per_sample = [s["generated_tokens"] / s["seconds"] for s in gen if s["seconds"] > 0]
        gpu, cpu = (sum(x["stats"].get(k, 0) for x in recs) for k in ("pairs_gpu", "pairs_cpu"))
        for name, value in metrics.items():
            metric, _, flt = name.partition(",")
            if metric.endswith("_stderr") or metric == "sample_len" or not isinstance(value, int | float) or \
                    isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            label = metric if flt in ("", "none") else f"{metric} ({flt})"
            ref = (against_rows or {}).get((task, label))
            out.append({
                "task": task, "metric": label, "value": value,
                "stderr": stderr if isinstance(stderr, int | float) else None, "policy": run.policy,
                "budget": run.budget, "slots_per_layer": lm.engine.store.slots, "regime": run.regime,
                "batch_size": lm.batch, "ranks": len(ranks), "samples": len(keys), "generated_tokens": tokens,
                "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else None,
                "tokens_per_s_per_rank": sum(rank_rate) / len(rank_rate) if rank_rate else None,
                "tokens_per_s_per_sample": sum(per_sample) / len(per_sample) if per_sample else None,
                "forwards": sum(x["stats"].get("forwards", 0) for x in recs),
                "mb_h2d": sum(x["stats"].get("bytes_h2d", 0) for x in recs) / 1e6,
                "gpu_hit_ratio": gpu / (gpu + cpu) if gpu + cpu else None, "against": against,
                "is_comparison": is_comparison, "lossless_level": "b" if cpu else "a",
                "identical_fraction": sum(same) / len(same) if same else None,
                "identical_to_tier_matched": sum(tier_same) / len(tier_same) if tier_same else None,
                "token_agreement": sum(agree) / len(agree) if agree else None,
                "ll_rel_diff_max": max(ll) if ll else None,
                "within_stderr": None if ref is None else abs(value - ref["value"]) <= max(
                    ref["stderr"] or 0.0, stderr if isinstance(stderr, int | float) else 0.0)})
    for r in out:
        if is_comparison or r["identical_fraction"] is None:
            r["lossless"] = None
        elif r["lossless_level"] == "a":  # same kernels on the same rows: exact
            r["lossless"] = r["identical_fraction"] == 1.0
        else:  # exact against the tier-matched replay, and within tolerance of the comparison (level c)
            r["lossless"] = (r["identical_to_tier_matched"] == 1.0 and r["within_stderr"] is not False
                             and (r["ll_rel_diff_max"] or 0.0) <= TOLERANCE.ll_rel_diff_max)
    return out


# ---- reporting -----------------------------------------------------------------------------------------------
def run_header(spec: EvalSpec, model: Path, against: str, why: str, notes: list[str],
               ranks: int = 1) -> dict[str, Any]:
    from tide.calibrate import machine_stamp

    stamp = machine_stamp(spec.device, spec.cpu_threads)
    machine = (f"{stamp['gpu'] or 'no GPU'}; CPU {stamp['cpu']}, {stamp['cores']} cores, torch {stamp['torch']}, "
               f"{stamp['torch_threads']} thread(s)")
    machine += f"; {ranks} data-parallel ranks (one engine each)" if ranks > 1 else ""
    return {"model": str(model), "command": spec.command, "commit": stamp["commit"], "machine": machine,
            "ranks": ranks,
            "against": against, "against_why": why, "notes": notes,
            "spec": {k: v for k, v in asdict(spec).items() if k not in ("command",)}}


def markdown(table: list[dict], header: dict[str, Any]) -> str:
    spec = header["spec"]
    lines = [f"# TIDE eval: {header['model']}", "", f"Command: `{header['command']}`  ",
             f"Machine: {header['machine']}  ", f"Commit: {header['commit']}", "",
             f"*Measured* on the machine above. Tasks {', '.join(spec['tasks'])}, limit {spec['limit']}, decode "
             f"{spec['decode'] or 'from the tasks'}, chat template {'on' if spec['apply_chat_template'] else 'off'}. "
             f"Compared with **{header['against']}**: {header['against_why']}.", ""]
    return "\n".join(lines + markdown_rows(table, header)) + "\n"


def markdown_rows(table: list[dict], header: dict[str, Any]) -> list[str]:
    """The per (run, task, metric) table, the verdict and the notes."""
    lines = ["Lossless contract (evals/lossless.py): `level` a = no expert on the host, so the outputs must equal "
             f"the {header['against']} run's (`identical`, the fraction of samples with the same token ids or "
             "log-likelihood); b = a host tier, so they must equal the tier-matched replay's (`tier-matched`: the "
             "same experts on the host, every other on the device) and stay within tolerance of the comparison "
             "(`agree`: token agreement; the metric within its stderr). tok/s, forwards, MB H2D and GPU hit ratio "
             "are from the same run as the score.", "",
             "| task | metric | policy | budget | regime | value | stderr | tok/s | forwards | MB H2D | GPU hit | "
             "level | identical | tier-matched | agree | verdict |", "|" + "---|" * 16]
    for r in table:
        verdict = "comparison" if r["is_comparison"] else "" if r["lossless"] is None else (
            "lossless" if r["lossless"] else "**LOSSY**")
        cells = [r["task"], r["metric"], r["policy"], r["budget"], r["regime"], f"{r['value']:.4f}",
                 _fmt(r["stderr"], ".4f"), _fmt(r["tokens_per_s"], ".2f"), str(r["forwards"]),
                 f"{r['mb_h2d']:.1f}", _fmt(r["gpu_hit_ratio"], ".3f"), r["lossless_level"],
                 _fmt(r["identical_fraction"], ".3f"), _fmt(r["identical_to_tier_matched"], ".3f"),
                 _fmt(r["token_agreement"], ".3f"), verdict]
        lines.append("| " + " | ".join(cells) + " |")
    lossy = sorted({r["policy"] for r in table if r["lossless"] is False})
    lines += ["", f"**LOSSY policies: {', '.join(lossy)}**" if lossy else
              "Every policy meets the lossless contract."]
    return lines + [f"- note: {n}" for n in header["notes"]]


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


def write(table: list[dict], requests: list[dict], header: dict[str, Any], out: Path) -> None:
    """eval.csv, requests.csv, eval.md, env.json: each written to a temp name and renamed, never half-written."""
    from tide.hub import atomic_write

    for name, text in (("eval.csv", pd.DataFrame(table).to_csv(index=False)),
                       ("requests.csv", pd.DataFrame(requests).to_csv(index=False)),
                       ("eval.md", markdown(table, header)), ("env.json", json.dumps(header, indent=2, default=str))):
        atomic_write(out / name, text)
