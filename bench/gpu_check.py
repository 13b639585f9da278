"""`make gpu-check`: the engine's CUDA paths run and checked on a bare GPU machine, in one prepared script.

Runs with the machine's own Python (torch, transformers, accelerate, pandas, scipy, click; no lm-eval, no
network) from a checkout: `PYTHONPATH=. python3 -m tide.bench.gpu_check`. Steps, each logged under
results/<date>-<gpu>-gpu-check/:
  1. the GPU tests (`pytest -m gpu tests/test_gpu.py`): reference twice bit-identical; lru and full-offload with
     one slot and one staging buffer bit-identical to it; tier-matched identity for tide and cpu-fallback; the
     copy stream overlapping compute; host arenas pinned in place; one sync per MoE layer-forward;
  2. `tide calibrate --device cuda` at LLaDA2.0-mini's expert shape (bf16);
  3. a mini-shaped bench (random weights, LAYERS layers, 64 and 128 experts per layer, both regimes, every
     policy) with the three lossless levels checked (`--check`).
Everything it needs is written by the project itself. Exits non-zero when any step fails; on a machine
without CUDA it says so and exits 0 without running anything. Meant to finish in under 8 minutes on an H100.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

LAYERS = 3  # layer 0 dense + 2 MoE layers of mini's shape: ~4.7 GB of random checkpoint, written once
ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], out: Path, timeout_s: int) -> dict:
    """Run one step, its output to <out>/<name>.log; returns its record (command, exit code, seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"gpu-check: {name}: {' '.join(cmd)}", flush=True)
    with (out / f"{name}.log").open("w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = 124
    record = {"step": name, "command": cmd, "exit_code": code, "seconds": round(time.perf_counter() - t0, 1)}
    print(f"gpu-check: {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {record['seconds']} s", flush=True)
    return record


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing was run.")
        return 0
    gpu = torch.cuda.get_device_name(0)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    out = ROOT / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{slug}-gpu-check"
    out.mkdir(parents=True)
    py, cores = sys.executable, len(os.sched_getaffinity(0))
    cli = [py, "-m", "tide.cli", "--threads", str(max(1, cores // 2))]
    steps = [
        step("pytest-gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"],
             out, 150),
        step("calibrate", [*cli, "calibrate", "--preset", "mini", "--dtype", "bfloat16", "--device", "cuda",
                           "--cpu-threads", str(max(1, cores // 2)), "--out", str(out / "profile-mini.json")],
             out, 60),
    ]
    steps.append(step("bench-mini", [*cli, "bench", "--model", "preset:mini", "--layers", str(LAYERS), "--device",
                                     "cuda", "--dtype", "bfloat16", "--budgets", "64/layer,128/layer", "--regime",
                                     "block-kv,full", "--policies",
                                     "reference,full-offload,lru,cpu-fallback,accelerate,tide", "--repeat", "1",
                                     "--gen-length", "64", "--cpu-threads", str(max(1, cores // 2)),
                                     "--profile", str(out / "profile-mini.json"), "--projections", "",
                                     "--check", "--out", str(out / "bench")], out, 360))
    failed = [s["step"] for s in steps if s["exit_code"] != 0]
    env = {"command": "make gpu-check", "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
           "cpu_cores": cores, "steps": steps, "failed": failed}
    (out / "env.json").write_text(json.dumps(env, indent=2))
    lines = [f"# gpu-check on {gpu}", "", f"torch {torch.__version__}, CUDA {torch.version.cuda}, {cores} CPU cores",
             "", "| step | exit | seconds | log |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['exit_code']} | {s['seconds']} | {s['step']}.log |" for s in steps]
    lines += ["", f"**FAILED: {', '.join(failed)}**" if failed else "Every step passed.", ""]
    if (out / "bench" / "bench.md").is_file():
        lines += ["The mini-shaped bench (measured, random weights: its routing is not LLaDA2.0's): bench/bench.md"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"gpu-check: results in {out}; " + (f"FAILED: {', '.join(failed)}" if failed else "every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
