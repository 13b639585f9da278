"""How close the host tier comes to the machine's read bandwidth: `python -m tide.bench.host_tier`.

For LLaDA2.0-mini and -flash expert shapes, bf16 and fp32, 1..32 tokens per expert and a miss set of 10 and 60
experts per layer-forward, with each host kernel that runs here (torch's swiglu; the compiled amx-bf16 and
avx512-bf16 in bf16, avx512 and avx2 in bf16 and fp32, tide.experts.host_kernels), it times the host tier as the
executor runs it (tide.calibrate.host_curve: the executor's workers, hand-off and staging) and divides the weight
bytes read by the time: GB/s. The machine's read bandwidth is measured on the same workers: each reads its own 1 GiB
buffer (the faster of torch's sum and the compiled load loop), at the start and again beside each configuration,
whose cells use that one (the bandwidth of a VM drifts). It also says which kernel `auto` picks here. Writes
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

from tide import passive_openmp

passive_openmp()  # before torch loads, as `tide` does: the study times the host tier as the CLI runs it

import torch  # noqa: E402

SHAPES = {"mini": (2048, 512), "flash": (4096, 1024)}
POOL_BYTES = 2 << 30  # experts cycled through per configuration: more than the last-level cache holds


def read_bandwidth(workers: int, mib: int = 1024, repeats: int = 5) -> tuple[float, str]:
    """(bytes per second, how) that `workers` single-threaded threads read together, each its own `mib` buffer
    (more than the last-level cache holds): the faster of torch's float32 sum and the compiled eight-stream load
    loop (tide_read_bytes in host_kernel.c, at the widest loads this CPU has: it builds on every x86-64 host)."""
    buffers = [torch.ones(mib << 18) for _ in range(workers)]  # float32
    readers = {"torch sum": lambda buf: buf.sum()}
    try:
        readers.update([compiled_reader()])
    except RuntimeError as why:
        print(f"host_tier: the compiled read loop does not run here ({why}); the yardstick is torch's sum only")
    rates = {how: workers * (mib << 20) / timed(reader, buffers, repeats) for how, reader in readers.items()}
    best = max(rates, key=rates.get)
    return rates[best], best + " (" + ", ".join(f"{h} {r / 1e9:.1f} GB/s" for h, r in rates.items()) + ")"


def compiled_reader():
    """("<n>-byte loads", buffer -> None): tide_read_bytes from the widest build this CPU runs (avx512f, avx2,
    else scalar); RuntimeError where it cannot be built here."""
    import ctypes

    from tide.experts.host_kernels import compile_library, cpu_features

    offered = cpu_features()
    build, width = ("avx512f", 64) if "avx512f" in offered else ("avx2", 32) if "avx2" in offered else ("scalar", 8)
    library = compile_library(build)
    library.tide_read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    library.tide_read_bytes.restype = ctypes.c_uint64
    return f"{width}-byte loads", lambda buf: library.tide_read_bytes(buf.data_ptr(), buf.numel() * buf.element_size())


def timed(reader, buffers: list[torch.Tensor], repeats: int) -> float:
    """Median seconds for all threads (one per buffer, started together) to finish `reader`."""
    times: list[float] = []

    def read(buf: torch.Tensor, start: threading.Barrier, out: list) -> None:
        torch.set_num_threads(1)
        start.wait()
        reader(buf)
        out.append(time.perf_counter())

    for i in range(repeats + 1):
        start, ends = threading.Barrier(len(buffers) + 1), []
        threads = [threading.Thread(target=read, args=(b, start, ends)) for b in buffers]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        start.wait()
        for t in threads:
            t.join()
        if i:  # the first pass warms up
            times.append(max(ends) - t0)
    return statistics.median(times)


@click.command()
@click.option("--workers", type=int, default=None, help="Host-expert workers [default: the CLI's default].")
@click.option("--tokens", default="1,2,4,8,32", show_default=True)
@click.option("--misses", default="10,60", show_default=True, help="Host experts per layer-forward.")
@click.option("--repeat", default=5, show_default=True)
@click.option("--kernels", default="torch,amx-bf16,avx512,avx512-bf16,avx2", show_default=True,
              help="Host kernels to measure, each in the dtypes it computes (those that cannot run here are skipped).")
@click.option("--out", default=None, help="Run directory (default: results/<date>-<host>-host-tier).")
def main(workers: int | None, tokens: str, misses: str, repeat: int, kernels: str, out: str | None) -> None:
    from tide.calibrate import host_curve, machine_stamp
    from tide.config import default_cpu_threads
    from tide.experts.host_kernels import KERNELS, host_kernel
    from tide.hub import atomic_write, new_run_dir

    workers = workers or default_cpu_threads()
    token_list = tuple(int(t) for t in tokens.split(","))
    run_dir = new_run_dir(out, "host-tier")
    picks = {str(d).removeprefix("torch."): host_kernel("auto", d, *SHAPES["mini"])[1]
             for d in (torch.bfloat16, torch.float32)}
    bandwidth, how = read_bandwidth(workers)
    rows, skipped, yardsticks = [], [], []
    for shape, (H, I) in SHAPES.items():
        for dtype, name in [(d, k) for d in (torch.bfloat16, torch.float32) for k in kernels.split(",")]:
            if name in KERNELS and dtype not in KERNELS[name].dtypes:
                continue
            try:
                kernel, _ = host_kernel(name, dtype, H, I)
            except ValueError as why:
                skipped.append(str(why))
                continue
            for miss in (int(m) for m in misses.split(",")):
                # the yardstick beside each configuration: these VMs' read bandwidth drifts ~20% within a run
                near = read_bandwidth(workers, repeats=3)[0]
                yardsticks.append(near)
                expert_bytes = 3 * H * I * dtype.itemsize
                curve = host_curve(H, I, dtype, workers, token_list, repeat, kernel, experts=miss,
                                   pool=-(-POOL_BYTES // expert_bytes))
                for n, seconds in curve:
                    rate = expert_bytes * workers / seconds  # workers experts in flight at once
                    rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "kernel": name,
                                 "miss_set": miss, "tokens": n, "workers": workers, "s_per_expert_per_worker": seconds,
                                 "weights_GBps": rate / 1e9, "read_GBps": near / 1e9,
                                 "share_of_read_bw": rate / near})
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    atomic_write(run_dir / "host_tier.csv", lambda tmp: df.to_csv(tmp, index=False))
    stamp = machine_stamp("cpu", workers)
    env = {"command": "python -m tide.bench.host_tier " + " ".join(sys.argv[1:]), "machine": stamp,
           "workers": workers, "read_bandwidth_GBps": bandwidth / 1e9, "read_bandwidth_how": how, "auto": picks,
           "read_bandwidth_beside_each_GBps": [round(y / 1e9, 2) for y in yardsticks]}
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2))
    table = df.pivot_table(index=["shape", "dtype", "kernel", "miss_set"], columns="tokens",
                           values="share_of_read_bw")
    lines = ["# Host tier: weight bytes per second against the read bandwidth", "", f"Command: `{env['command']}`  ",
             f"Commit: {stamp['commit']}  ", f"Machine: CPU {stamp['cpu']}, torch {stamp['torch']}, {workers} "
             f"host-expert worker(s)", "",
             f"*Measured*: read bandwidth {bandwidth / 1e9:.1f} GB/s at the start ({workers} worker(s), each reading "
             f"its own 1 GiB buffer; the faster of: {how}), and again beside each configuration, whose cells use "
             f"that one (median {statistics.median(yardsticks) / 1e9:.1f}, range {min(yardsticks) / 1e9:.1f}-"
             f"{max(yardsticks) / 1e9:.1f} GB/s). "
             "Each cell: the host tier's weight bytes per second (experts "
             "computed as the executor computes them: its workers, hand-off and staging, `miss_set` distinct experts "
             f"per layer-forward, n tokens each, cycling through {POOL_BYTES >> 30} GiB of experts so the weights "
             "come from memory) over that bandwidth. Columns: tokens per expert.",
             "", *[f"`--host-kernel auto` here, {d}: {note}  " for d, note in picks.items()],
             *([""] + [f"Not measured: {s}" for s in sorted(set(skipped))] if skipped else []), "",
             "| shape | dtype | kernel | miss set | " + " | ".join(f"{n} tok" for n in table.columns) + " |",
             "|" + "---|" * (4 + len(table.columns))]
    for (shape, dtype, name, miss), values in table.iterrows():
        lines.append(f"| {shape} | {dtype} | {name} | {miss} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", "Speed relative to torch's swiglu (same shape, dtype, miss set; > 1 is faster):", "",
              "| shape | dtype | kernel | miss set | " + " | ".join(f"{n} tok" for n in table.columns) + " |",
              "|" + "---|" * (4 + len(table.columns))]
    for (shape, dtype, name, miss), values in table.iterrows():
        if name != "torch" and (shape, dtype, "torch", miss) in table.index:
            torch_row = table.loc[(shape, dtype, "torch", miss)]
            lines.append(f"| {shape} | {dtype} | {name} | {miss} | "
                         + " | ".join(f"{v / t:.2f}" for v, t in zip(values, torch_row, strict=True)) + " |")
    atomic_write(run_dir / "host_tier.md", "\n".join(lines) + "\n")
    print((run_dir / "host_tier.md").read_text())
    print(json.dumps({"out": str(run_dir)}))


if __name__ == "__main__":
    main()
