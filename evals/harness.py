"""`tide eval`: lm-eval's simple_evaluate for each policy on offline tasks, and the losslessness verdict.

Writes eval.csv (task x metric x policy, with stderr and the fraction of samples whose output is identical
to the reference policy's) and eval.md, where any policy whose score or outputs differ is flagged LOSSY.
Hub access is switched off for the run (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE): every task is local.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

TASK_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_TASKS = ("tide_arith", "tide_arith_mc")


@dataclass
class EvalRun:
    label: str  # policy name as shown
    lm: Any  # a TideLM
    budget: str | None = None
    results: dict = field(default_factory=dict)


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def evaluate(runs: list[EvalRun], tasks: list[str], limit: int | None, confirm_unsafe_code: bool = False) -> None:
    from lm_eval import simple_evaluate

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    manager = task_manager()
    for run in runs:
        run.results = simple_evaluate(model=run.lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      log_samples=False, bootstrap_iters=100,
                                      confirm_run_unsafe_code=confirm_unsafe_code)["results"]


def rows(runs: list[EvalRun], reference: str = "reference") -> list[dict]:
    """One row per (task, metric, policy), with identity against the reference run's outputs."""
    ref = next((r for r in runs if r.label == reference), None)
    ref_out = {(x["task"], x["doc_id"], x["idx"]): x["output"] for x in ref.lm.records} if ref else {}
    out = []
    for run in runs:
        mine = {(x["task"], x["doc_id"], x["idx"]): x["output"] for x in run.lm.records}
        for task, metrics in run.results.items():
            keys = [k for k in mine if k[0] == task]
            same = [mine[k] == ref_out.get(k) for k in keys] if ref else []
            for name, value in metrics.items():
                metric, _, flt = name.partition(",")
                meta = metric.endswith("_stderr") or metric in ("alias", "sample_len")
                if meta or not isinstance(value, int | float):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{flt}")
                out.append({"task": task, "metric": metric, "value": value,
                            "stderr": stderr if isinstance(stderr, int | float) else None, "policy": run.label,
                            "budget": run.budget or "all", "samples": len(keys),
                            "identical_fraction": sum(same) / len(same) if same else None})
    if ref:
        ref_values = {(r["task"], r["metric"]): r["value"] for r in out if r["policy"] == reference}
        for r in out:
            r["lossless"] = (r["identical_fraction"] == 1.0 and r["value"] == ref_values.get((r["task"], r["metric"])))
    return out


def markdown(table: list[dict], header: dict[str, Any]) -> str:
    lines = [f"# TIDE eval: {header.get('model')}", "", f"Command: `{header.get('command')}`  ",
             f"Machine: {header.get('machine')}  ", f"Commit: {header.get('commit')}", "",
             "*Measured*. `identical`: fraction of samples whose output (generated token ids, or the Monte Carlo "
             "log-likelihood) equals the reference policy's exactly.", "",
             "| task | metric | policy | budget | value | stderr | samples | identical | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        verdict = "" if r.get("lossless") is None else ("lossless" if r["lossless"] else "**LOSSY**")
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        ident = "n/a" if r["identical_fraction"] is None else f"{r['identical_fraction']:.3f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['policy']} | {r['budget']} | {r['value']:.4f} | "
                     f"{stderr} | {r['samples']} | {ident} | {verdict} |")
    lossy = sorted({r["policy"] for r in table if r.get("lossless") is False})
    lines += ["", f"**LOSSY policies: {', '.join(lossy)}**" if lossy else "Every policy matches the reference."]
    return "\n".join(lines) + "\n"


def write(table: list[dict], header: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(table).to_csv(out / "eval.csv", index=False)
    (out / "eval.md").write_text(markdown(table, header))
    (out / "env.json").write_text(json.dumps(header, indent=2, default=str))


def run_cli(model_dir: str | None, tasks: str | None, policies: str, gpu_budget: str, limit: int | None, regime: str,
            device: str, dtype: str | None, cpu_threads: int, mc_samples: int, refresh_interval: int,
            confirm_unsafe_code: bool, out: str | None, command: str) -> tuple[dict, str]:
    """What `tide eval` does: one engine per policy, lm-eval on each, the table and the verdict."""
    import datetime
    import platform

    import baselines  # noqa: F401
    import tide.refresh  # noqa: F401
    from evals.lm_eval_model import TideLM
    from tide.calibrate import machine_stamp
    from tide.checkpoint import SOURCE_ROOT, resolve_model
    from tide.engine import load

    model = resolve_model(model_dir)
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if "reference" not in names:
        names.insert(0, "reference")
    task_list = [t.strip() for t in (tasks or ",".join(DEFAULT_TASKS)).split(",") if t.strip()]
    runs = []
    for name in names:
        budget = None if name == "reference" else gpu_budget
        options = {"refresh_interval": refresh_interval} if name == "tide" else {}
        engine = load(model, policy=name, gpu_budget=budget, device=device, dtype=dtype, cpu_threads=cpu_threads,
                      **options)
        runs.append(EvalRun(name, TideLM(policy=name, regime=regime, mc_samples=mc_samples, engine=engine), budget))
    evaluate(runs, task_list, limit, confirm_unsafe_code)
    table = rows(runs)
    stamp = machine_stamp(device, cpu_threads)
    run_dir = Path(out) if out else SOURCE_ROOT / "results" / (
        datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{platform.node() or 'host'}-eval")
    header = {"model": str(model), "command": command, "commit": stamp["commit"],
              "machine": f"{stamp['gpu'] or 'no GPU'}; CPU {stamp['cpu']}, {stamp['cores']} cores, torch "
                         f"{stamp['torch']}, {stamp['torch_threads']} thread(s)", "tasks": task_list, "limit": limit,
              "regime": regime, "gpu_budget": gpu_budget, "mc_samples": mc_samples}
    write(table, header, run_dir)
    lossy = sorted({r["policy"] for r in table if r.get("lossless") is False})
    return {"out": str(run_dir), "rows": len(table), "lossy": lossy}, (run_dir / "eval.md").read_text()
