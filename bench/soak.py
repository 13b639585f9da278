"""`make soak`: many requests through one engine across policies and budgets, watching for leaks.

`python -m tide.bench.soak [--requests N]`: one engine, reconfigured every few requests through every policy and
budget (round robin), each request one of the bench prompts. After a warm-up pass over every configuration it
asserts: resident memory (RSS) flat (growth within --rss-slack-mb), device memory flat on CUDA, no more threads
or open file descriptors than during the warm-up pass, and identical tokens every time a prompt is decoded again. Writes
results/<date>-<host>-soak/soak.csv (one row per request), soak.md and env.json, like a bench run; exits 1 when
any check fails.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import click
import pandas as pd

from tide import passive_openmp
from tide.options import UserErrorCommand, device_option

passive_openmp()  # torch loads later, inside the commands: its OpenMP threads then sleep at barriers, as in `tide`

POLICIES = "reference,full-offload,lru,cpu-fallback,accelerate,tide"


def process_stats(device) -> dict[str, float]:
    import psutil
    import torch

    gpu = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return {"rss_mb": psutil.Process().memory_info().rss / 2**20, "threads": threading.active_count(),
            "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0, "gpu_mb": gpu}


@click.command(cls=UserErrorCommand)
@click.option("--model", default=None, help="Checkpoint (default: the built-in model).")
@click.option("--requests", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--policies", default=POLICIES, show_default=True)
@click.option("--budgets", default="25%,50%", show_default=True)
@click.option("--per-config", type=click.IntRange(min=1), default=5, show_default=True,
              help="Requests before the engine is reconfigured.")
@click.option("--gen-length", type=click.IntRange(min=1), default=32, show_default=True)
@device_option()
@click.option("--rss-slack-mb", default=64.0, show_default=True, help="Allowed RSS growth after the warm-up pass.")
@click.option("--out", default=None, help="Run directory (default: results/<date>-<host>-soak).")
def main(model, requests, policies, budgets, per_config, gen_length, device, rss_slack_mb, out) -> None:
    import tide.baselines  # noqa: F401
    import tide.refresh  # noqa: F401
    from tide.bench.runner import read_prompts
    from tide.calibrate import machine_stamp
    from tide.config import DecodeConfig
    from tide.engine import load
    from tide.hub import atomic_write, new_run_dir, resolve_model

    path = resolve_model(model)
    configs = [(p, None if p == "reference" else b) for p in policies.split(",") for b in budgets.split(",")]
    configs = list(dict.fromkeys(configs))
    from tide.policy import load_registered

    unknown = [p for p, _ in configs if p not in load_registered()]
    if unknown:
        raise ValueError(f"--policies {', '.join(dict.fromkeys(unknown))}: choose from "
                         f"{', '.join(sorted(load_registered()))}")
    cfg = DecodeConfig(gen_length=gen_length)
    engine = load(path, policy="lru", gpu_budget=budgets.split(",")[0], device=device)
    run_dir = new_run_dir(out, "soak")  # after the load: a refused model leaves no run directory
    prompts = [engine.encode(p) for p in read_prompts(None)]
    seen: dict[int, list[int]] = {}
    rows, warm = [], None
    for i in range(requests):
        c = (i // per_config) % len(configs)
        if i % per_config == 0:
            options = {"refresh_interval": 2} if configs[c][0] == "tide" else {}
            engine.configure(configs[c][0], configs[c][1], **options)
        k = i % len(prompts)
        tokens = engine.run(prompts[k], cfg)["tokens"]
        same = seen.setdefault(k, tokens) == tokens
        rows.append({"request": i, "policy": configs[c][0], "budget": configs[c][1] or "all", "prompt": k,
                     "identical": same, **process_stats(engine.store.device)})
        if i + 1 == per_config * len(configs):
            warm = rows[-1]  # every configuration has run once
    engine.executor.close()
    df = pd.DataFrame(rows)
    atomic_write(run_dir / "soak.csv", lambda tmp: df.to_csv(tmp, index=False))
    end = rows[-1]
    failures = [f"request {r['request']} ({r['policy']}, prompt {r['prompt']}): tokens differ from its first run"
                for r in rows if not r["identical"]]
    if warm is not None:
        if end["rss_mb"] - warm["rss_mb"] > rss_slack_mb:
            failures.append(f"RSS grew {end['rss_mb'] - warm['rss_mb']:.1f} MB after the warm-up pass")
        if end["gpu_mb"] - warm["gpu_mb"] > 1:
            failures.append(f"device memory grew {end['gpu_mb'] - warm['gpu_mb']:.1f} MB after the warm-up pass")
        cycle = per_config * len(configs)  # thread and file counts depend on the policy: compare peaks per pass
        for key in ("threads", "fds"):
            first, later = df[key][:cycle].max(), df[key][cycle:].max()
            if len(df) > cycle and later > first:
                failures.append(f"{key}: at most {first} in the warm-up pass, {later} after it")
    else:
        failures.append(f"{requests} requests do not cover every configuration once ({per_config * len(configs)})")
    if not df.prompt.duplicated().any():  # the identity check compares a prompt's runs: none ran twice
        failures.append(f"no prompt was decoded twice ({requests} requests, {len(prompts)} prompts): raise "
                        "--requests for the identity check to mean anything")
    stamp = machine_stamp(device, engine.cpu_threads)
    env = {"command": "python -m tide.bench.soak " + " ".join(sys.argv[1:]), "model": str(path), "machine": stamp,
           "configs": configs, "failures": failures}
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2, default=str))
    lines = [f"# Soak: {requests} requests through one engine ({path})", "", f"Command: `{env['command']}`  ",
             f"Commit: {stamp['commit']}  ", f"Machine: {stamp['gpu'] or 'no GPU'}; CPU {stamp['cpu']}", "",
             f"*Measured*. {len(configs)} configurations, {per_config} requests each in turn. After the warm-up pass "
             f"(request {warm['request'] if warm else '-'}) and at the end:", "",
             "| | RSS MB | threads | fds | GPU MB |", "|---|---|---|---|---|"]
    for label, r in (("after warm-up", warm), ("end", end)):
        if r is not None:
            lines.append(f"| {label} | {r['rss_mb']:.1f} | {r['threads']} | {r['fds']} | {r['gpu_mb']:.1f} |")
    lines += ["", f"Repeated prompts identical: {int(df.identical.sum())}/{len(df)}.", "",
              *([f"**FAILED: {f}**" for f in failures] or ["Every check holds."])]
    atomic_write(run_dir / "soak.md", "\n".join(lines) + "\n")
    click.echo((run_dir / "soak.md").read_text())
    click.echo(json.dumps({"out": str(run_dir), "failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
