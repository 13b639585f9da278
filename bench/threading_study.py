"""The threading study behind TIDE's defaults (README, "Threads"): `python -m tide.bench.threading_study`.

Runs `tide generate --policy cpu-fallback --gpu-budget 25%` (a host-tier policy: the main thread's intra-op
team and the expert workers both busy) in fresh processes, under every combination of --threads and
--cpu-threads up to the usable cores, with OpenMP threads sleeping at barriers (PASSIVE, the CLI's default)
and with libgomp's own default (spin for a while, then sleep), on a quiet machine and with one core kept busy by another
process. Medians of `--repeat` runs; writes results/<date>-<host>-threads/threads.csv, threads.md, env.json.
Measured on the machine it runs on; tokens are the same in every run (checked).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import click
import pandas as pd

ARGS = ["--prompt-ids", "1,2,3,4,5", "--gen-length", "64", "--policy", "cpu-fallback", "--gpu-budget", "25%",
        "--json"]


def one_run(model: str, threads: int | None, cpu_threads: int | None, policy: str) -> tuple[float, list[int]]:
    cmd = [sys.executable, "-m", "tide.cli", *(["--threads", str(threads)] if threads else []), "generate",
           "--model", model, *ARGS, *(["--cpu-threads", str(cpu_threads)] if cpu_threads else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600,
                         env={**os.environ, "OMP_WAIT_POLICY": policy}).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return result["stats"]["tokens_per_s"], result["tokens"]


def busy_core() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


@click.command()
@click.option("--model", default="preset:tiny", show_default=True, help="Checkpoint (the issue measured a tiny one).")
@click.option("--repeat", default=3, show_default=True, help="Runs per cell (median reported).")
@click.option("--out", default=None, help="Run directory (default: results/<date>-<host>-threads).")
def main(model: str, repeat: int, out: str | None) -> None:
    from tide.calibrate import machine_stamp
    from tide.config import default_cpu_threads, default_threads, usable_cores
    from tide.hub import atomic_write, new_run_dir, resolve_model

    path = str(resolve_model(model))
    cores = usable_cores()
    settings = [(None, None)] + [(t, c) for t in range(1, cores + 1) for c in range(1, cores + 1)]
    rows, tokens = [], None
    run_dir = new_run_dir(out, "threads")
    for condition in ("quiet", "one core busy"):
        load = busy_core() if condition != "quiet" else None
        try:
            for policy in ("PASSIVE", ""):  # "": libgomp's own default (spin a while, then sleep)
                for threads, cpu_threads in settings:
                    runs = [one_run(path, threads, cpu_threads, policy) for _ in range(repeat)]
                    if tokens is None:
                        tokens = runs[0][1]
                    assert all(t == tokens for _, t in runs), "tokens differ between thread settings"
                    tps = [r for r, _ in runs]
                    rows.append({"condition": condition, "omp_wait_policy": policy or "unset (libgomp default)",
                                 "threads": threads or f"default ({default_threads()})",
                                 "cpu_threads": cpu_threads or f"default ({default_cpu_threads()})",
                                 "tokens_per_s": statistics.median(tps), "min": min(tps), "max": max(tps)})
                    print(rows[-1], flush=True)
        finally:
            if load is not None:
                load.kill()
    df = pd.DataFrame(rows)
    best = df.groupby("condition").tokens_per_s.transform("max")
    df["best_over_this"] = (best / df.tokens_per_s).round(2)
    atomic_write(run_dir / "threads.csv", lambda tmp: df.to_csv(tmp, index=False))
    env = {"command": "python -m tide.bench.threading_study " + " ".join(sys.argv[1:]), "model": path,
           "generate_args": ARGS, "machine": machine_stamp("cpu", None), "cores": cores}
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2))
    lines = [f"# Threads: tide generate under every thread setting ({path})", "",
             f"Command: `{env['command']}`  ", f"Commit: {env['machine']['commit']}  ",
             f"Machine: CPU {env['machine']['cpu']}, {cores} usable cores, torch {env['machine']['torch']}", "",
             f"*Measured*: `tide generate {' '.join(ARGS)}`, median of {repeat} fresh processes per cell (min-max "
             "beside it); `one core busy`: another process spins on one core throughout. `best_over_this`: the "
             "best cell of the same condition over this one (1.5 or less is the bar for the defaults). Every run "
             "produced the same tokens.", ""]
    for condition, grp in df.groupby("condition", sort=False):
        lines += [f"## {condition}", "",
                  "| OMP_WAIT_POLICY | --threads | --cpu-threads | tok/s | min-max | best/this |", "|" + "---|" * 6]
        lines += [f"| {r.omp_wait_policy} | {r.threads} | {r.cpu_threads} | {r.tokens_per_s:.1f} | {r['min']:.1f}-"
                  f"{r['max']:.1f} | {r.best_over_this} |" for _, r in grp.iterrows()]
        lines.append("")
    atomic_write(run_dir / "threads.md", "\n".join(lines))
    print((run_dir / "threads.md").read_text())
    print(json.dumps({"out": str(run_dir)}))


if __name__ == "__main__":
    main()
