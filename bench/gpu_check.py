"""`make gpu-check`: the engine's CUDA paths run and checked on a bare GPU machine, in one prepared script.

Runs with the machine's own Python (torch, transformers, accelerate, pandas, scipy, click; no lm-eval, no
network) from a checkout: `PYTHONPATH=. python3 -m tide.bench.gpu_check`. Steps, each logged under
results/<date>-<gpu>-gpu-check/, each bounded by what it must show and by its own time limit:
  1. the GPU tests (`pytest -m gpu tests/test_gpu.py`): reference twice bit-identical; lru, full-offload and
     accelerate with one slot and one staging buffer bit-identical to it; tier-matched identity for tide and
     cpu-fallback; every device expert through swiglu; the copy stream overlapping compute; host arenas pinned in
     place and unpinned on close; exactly one wait per MoE layer-forward and no other sync; grouped within level c;
  2. a random checkpoint of LLaDA2.0-mini's shape at LAYERS layers (written once into .cache, timed apart);
  3. `tide calibrate --device cuda` at mini's expert shape, host curve up to 64 tokens (where the bench's experts
     are; beyond it the cost model extrapolates);
  4. a mini-shaped bench: every policy at 64 experts per layer, both regimes, 6 prompts x 64 tokens (384
     teacher-forced positions for level c), at most 8 steps per block, the three lossless levels checked (`--check`);
  5. the same model batched (issue 22's GPU run): reference, lru, cpu-fallback and tide at 64 experts per layer,
     block-kv, batch sizes 1, 4 and 16 over the 16 requests of bench/prompts-batch.jsonl (32 tokens, 8 steps), the
     lossless levels checked, beside the modelled H100/A100 projections of the same runs.
summary.md and env.json are rewritten after every step, so a run cut short still says what it did; a step that
would start with less than its minimum time left is skipped and listed. The whole script stays within TOTAL_S.
Exits non-zero when any step fails or is skipped; on a machine without CUDA it says so and exits 0 without running
anything. `--rehearse` runs steps 2-5 on the CPU (device cpu) to time them where there is no GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

LAYERS = 3  # layer 0 dense + 2 MoE layers of mini's shape: ~4.7 GB of random checkpoint, written once
TOTAL_S = 540  # the whole script: 9 minutes, inside one 10-minute device command (a session's 15 minutes less the
#               machine's start); steps 1-4 fit in the first 7.5, the batched bench (last) runs in what is left
ROOT = Path(__file__).resolve().parents[1]
BATCH_PROMPTS = Path(__file__).resolve().with_name("prompts-batch.jsonl")  # 16 requests of mixed lengths


def step(name: str, cmd: list[str], out: Path, timeout_s: float) -> dict:
    """Run one step, its output to <out>/<name>.log; returns its record (command, exit code, seconds)."""
    t0 = time.perf_counter()
    paths = [str(ROOT), *(str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}
    print(f"gpu-check: {name} (limit {timeout_s:.0f} s): {' '.join(cmd)}", flush=True)
    with (out / f"{name}.log").open("w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 124
    record = {"step": name, "command": cmd, "exit_code": code, "seconds": round(time.perf_counter() - t0, 1),
              "limit_s": round(timeout_s)}
    print(f"gpu-check: {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {record['seconds']} s", flush=True)
    return record


def plan(py: str, out: Path, device: str, workers: int, model: Path) -> list[tuple[str, list[str], int, int]]:
    """(name, command, time limit s, minimum time s to start it) for every step, in order."""
    cli = [py, "-m", "tide.cli", "--threads", str(workers)]
    profile = str(out / "profile-mini.json")
    bench = [*cli, "bench", "--model", "preset:mini", "--layers", str(LAYERS), "--device", device, "--dtype",
             "bfloat16", "--budgets", "64/layer", "--steps", "8", "--repeat", "1", "--cpu-threads", str(workers),
             "--profile", profile, "--check"]  # what both bench steps share
    steps = [("checkpoint", [*cli, "make-checkpoint", "--preset", "mini", "--layers", str(LAYERS), "--out",
                             str(model)], 90, 30),
             ("calibrate", [*cli, "calibrate", "--preset", "mini", "--dtype", "bfloat16", "--device", device,
                            "--cpu-threads", str(workers), "--max-tokens", "64", "--repeats", "5", "--out", profile],
              60, 20),
             ("bench-mini", [*bench, "--regime", "block-kv,full", "--policies",
                             "reference,full-offload,lru,cpu-fallback,accelerate,tide", "--gen-length", "64",
                             "--projections", "", "--out", str(out / "bench")], 240, 120),
             ("bench-batches", [*bench, "--regime", "block-kv", "--policies", "reference,lru,cpu-fallback,tide",
                                "--batch-sizes", "1,4,16", "--prompts", str(BATCH_PROMPTS), "--gen-length", "32",
                                "--out", str(out / "batches")], 150, 60)]
    if device.startswith("cuda"):
        steps.insert(0, ("pytest-gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                        "tests/test_gpu.py"], 120, 60))
    return steps


def write_summary(out: Path, env: dict, steps: list[dict], pending: list[str]) -> None:
    failed = [s["step"] for s in steps if s["exit_code"] != 0]
    env = {**env, "steps": steps, "failed": failed, "not_run": pending}
    (out / "env.json").write_text(json.dumps(env, indent=2))
    lines = [f"# gpu-check on {env['gpu']}", "", f"Command: `{env['command']}`  ", f"Commit: {env['commit']}  ",
             f"torch {env['torch']}, CUDA {env['cuda']}, {env['cpu_cores']} CPU cores ({env['cpu']}), "
             f"{env['workers']} host-expert workers", "", "| step | exit | seconds | limit s | log |",
             "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit_code']} | {s['seconds']} | {s['limit_s']} | {s['step']}.log |" for s in steps]
    lines += [f"| {name} | not run | | | |" for name in pending]
    lines += ["", f"**FAILED: {', '.join(failed)}**" if failed else
              ("**Not finished**: the steps marked 'not run' are missing." if pending else "Every step passed."), ""]
    if (out / "bench" / "bench.md").is_file():
        lines += ["The mini-shaped bench (measured, random weights: its routing is not LLaDA2.0's): bench/bench.md", ""]
    if (out / "batches" / "bench.md").is_file():
        lines += ["The batched bench (measured on this machine, with modelled H100/A100 projections beside it): "
                  "batches/bench.md", ""]
    (out / "summary.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tide.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--rehearse", action="store_true",
                        help="run the steps after the GPU tests on the CPU (device cpu), to time them without a GPU")
    args = parser.parse_args(argv)
    import torch

    from tide.bench.hardware import stamp
    from tide.config import usable_cores
    from tide.hub import cache_dir, source_stamp

    if not torch.cuda.is_available() and not args.rehearse:
        print("gpu-check: no CUDA device on this machine; nothing was run.")
        return 0
    device = "cpu" if args.rehearse else "cuda"
    gpu = "no GPU (rehearsal on the CPU)" if args.rehearse else torch.cuda.get_device_name(0)
    slug = "cpu-rehearsal" if args.rehearse else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = ROOT / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{slug}-gpu-check"
    out.mkdir(parents=True)
    cores = usable_cores()
    workers = max(1, cores // 2)
    hw = stamp(device, workers)
    env = {"command": "make gpu-check" + (" (python -m tide.bench.gpu_check --rehearse)" if args.rehearse else ""),
           "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "cpu": hw.get("hw_cpu"),
           "cpu_cores": cores, "workers": workers, "commit": source_stamp(), "total_limit_s": TOTAL_S}
    model = cache_dir() / f"mini-{LAYERS}layers-random"
    todo = plan(sys.executable, out, device, workers, model)
    done: list[dict] = []
    deadline = time.perf_counter() + TOTAL_S
    write_summary(out, env, done, [name for name, *_ in todo])
    for i, (name, cmd, limit_s, minimum_s) in enumerate(todo):
        left = deadline - time.perf_counter()
        if name == "checkpoint" and (model / "config.json").is_file():
            continue  # written by an earlier run: nothing to time
        if left < minimum_s:
            print(f"gpu-check: {name}: not started, {left:.0f} s left of {TOTAL_S} (it needs {minimum_s})")
            break
        done.append(step(name, cmd, out, min(limit_s, left)))
        write_summary(out, env, done, [n for n, *_ in todo[i + 1:]])
    pending = [n for n, *_ in todo if n not in {s["step"] for s in done}
               and not (n == "checkpoint" and (model / "config.json").is_file())]
    write_summary(out, env, done, pending)
    failed = [s["step"] for s in done if s["exit_code"] != 0]
    print(f"gpu-check: results in {out}; " + (f"FAILED: {', '.join(failed)}" if failed else
                                              f"not run: {', '.join(pending)}" if pending else "every step passed"))
    return 1 if failed or pending else 0


if __name__ == "__main__":
    sys.exit(main())
