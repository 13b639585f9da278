"""How close the host tier comes to the machine's read bandwidth: `python -m tide.bench.host_tier`.

For LLaDA2.0-mini and -flash expert shapes, bf16 and fp32, 1..32 tokens per expert and a miss set of 10 and 60
experts per layer-forward, it times the host tier as the executor runs it (tide.calibrate.host_curve: the
executor's workers, hand-off and staging) and divides the weight bytes read by the time: GB/s. The machine's
read bandwidth is measured the same way, on the same workers: each sums its own 256 MiB buffer. Writes
results/<date>-<host>-host-tier/host_tier.csv, host_tier.md, env.json. Measured on the machine it runs on.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time

import click
import pandas as pd
import torch

SHAPES = {"mini": (2048, 512), "flash": (4096, 1024)}


def read_bandwidth(workers: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second that `workers` single-threaded threads read together, each reducing its own buffer."""
    buffers = [torch.ones(mib << 18) for _ in range(workers)]  # float32: 256 MiB each
    times: list[float] = []

    def reduce(buf: torch.Tensor, start: threading.Barrier, out: list) -> None:
        torch.set_num_threads(1)
        start.wait()
        buf.sum()
        out.append(time.perf_counter())

    for i in range(repeats + 1):
        start, ends = threading.Barrier(workers + 1), []
        threads = [threading.Thread(target=reduce, args=(b, start, ends)) for b in buffers]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        if i:  # the first pass warms up
            times.append(max(ends) - t0)
    return workers * (mib << 20) / statistics.median(times)


@click.command()
@click.option("--workers", type=int, default=None, help="Host-expert workers [default: the CLI's default].")
@click.option("--tokens", default="1,2,4,8,32", show_default=True)
@click.option("--misses", default="10,60", show_default=True, help="Host experts per layer-forward.")
@click.option("--repeat", default=5, show_default=True)
@click.option("--out", default=None, help="Run directory (default: results/<date>-<host>-host-tier).")
def main(workers: int | None, tokens: str, misses: str, repeat: int, out: str | None) -> None:
    from tide.calibrate import host_curve, machine_stamp
    from tide.config import default_cpu_threads
    from tide.hub import atomic_write, new_run_dir

    workers = workers or default_cpu_threads()
    token_list = tuple(int(t) for t in tokens.split(","))
    run_dir = new_run_dir(out, "host-tier")
    bandwidth = read_bandwidth(workers)
    rows = []
    for shape, (H, I) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            for miss in (int(m) for m in misses.split(",")):
                curve = host_curve(H, I, dtype, workers, token_list, repeat, experts=miss)
                expert_bytes = 3 * H * I * dtype.itemsize
                for n, seconds in curve:
                    rate = expert_bytes * workers / seconds  # workers experts in flight at once
                    rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "miss_set": miss,
                                 "tokens": n, "workers": workers, "s_per_expert_per_worker": seconds,
                                 "weights_GBps": rate / 1e9, "read_GBps": bandwidth / 1e9,
                                 "share_of_read_bw": rate / bandwidth})
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    atomic_write(run_dir / "host_tier.csv", lambda tmp: df.to_csv(tmp, index=False))
    stamp = machine_stamp("cpu", workers)
    env = {"command": "python -m tide.bench.host_tier " + " ".join(sys.argv[1:]), "machine": stamp,
           "workers": workers, "read_bandwidth_GBps": bandwidth / 1e9}
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2))
    table = df.pivot_table(index=["shape", "dtype", "miss_set"], columns="tokens", values="share_of_read_bw")
    lines = ["# Host tier: weight bytes per second against the read bandwidth", "", f"Command: `{env['command']}`  ",
             f"Commit: {stamp['commit']}  ", f"Machine: CPU {stamp['cpu']}, torch {stamp['torch']}, {workers} "
             f"host-expert worker(s)", "",
             f"*Measured*: read bandwidth {bandwidth / 1e9:.1f} GB/s ({workers} worker(s), each summing its own "
             "256 MiB float32 buffer). Each cell: the host tier's weight bytes per second (experts computed as the "
             "executor computes them: its workers, hand-off and staging, `miss_set` distinct experts per "
             "layer-forward, n tokens each) over that bandwidth. Columns: tokens per expert.", "",
             "| shape | dtype | miss set | " + " | ".join(f"{n} tok" for n in table.columns) + " |",
             "|" + "---|" * (3 + len(table.columns))]
    for (shape, dtype, miss), values in table.iterrows():
        lines.append(f"| {shape} | {dtype} | {miss} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    atomic_write(run_dir / "host_tier.md", "\n".join(lines) + "\n")
    print((run_dir / "host_tier.md").read_text())
    print(json.dumps({"out": str(run_dir)}))


if __name__ == "__main__":
    main()
