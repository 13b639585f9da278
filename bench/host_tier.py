"""How close the host tier comes to the machine's read bandwidth: `python -m tide.bench.host_tier`.

For LLaDA2.0-mini and -flash expert shapes, bf16 and fp32, 1..32 tokens per expert and a miss set of 10 and 60
experts per layer-forward, with each host kernel that runs here (torch's swiglu; the compiled amx-bf16 and
avx512-bf16 in bf16, avx512 and avx2 in bf16 and fp32, tide.experts.host_kernels), it times the host tier as the
executor runs it (tide.calibrate.host_curve: the executor's workers, hand-off and staging) and divides the weight
bytes read by the time: GB/s. The machine's read bandwidth is measured on the same workers: each reads its own 1 GiB
buffer (the fastest of torch's sum and the compiled load loop at 1, 2 and 4 streams), at the start and again beside
each configuration, whose cells use that one (the bandwidth of a VM drifts). The FMA peak of the same workers bounds
the FMA kernels at many tokens: a second table gives each cell's share of the roofline (the lesser of the two). It
also says which kernel `auto` picks here. Writes
results/<date>-<host>-host-tier/host_tier.csv, host_tier.md, env.json. Measured on the machine it runs on.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable

import click
import pandas as pd

from tide import passive_openmp

passive_openmp()  # before torch loads, as `tide` does: the study times the host tier as the CLI runs it

import torch  # noqa: E402

SHAPES = {"mini": (2048, 512), "flash": (4096, 1024)}
POOL_BYTES = 2 << 30  # experts cycled through per configuration: more than the last-level cache holds


def read_bandwidth(workers: int, mib: int = 1024, repeats: int = 5) -> tuple[float, str]:
    """(bytes per second, how) that `workers` single-threaded threads read together, each its own `mib` buffer
    (more than the last-level cache holds): the fastest of torch's float32 sum and the compiled load loop
    (tide_read_bytes in host_kernel.c, at the widest loads this CPU has, reading 1, 2 or 4 streams side by side: it
    builds on every x86-64 host)."""
    buffers = [torch.ones(mib << 18) for _ in range(workers)]  # float32
    readers = {"torch sum": lambda buf: buf.sum()}
    try:
        readers.update(compiled_readers())
    except RuntimeError as why:
        print(f"host_tier: the compiled read loop does not run here ({why}); the yardstick is torch's sum only")
    rates = {how: workers * (mib << 20) / timed(reader, buffers, repeats) for how, reader in readers.items()}
    best = max(rates, key=rates.get)
    return rates[best], best + " (" + ", ".join(f"{h} {r / 1e9:.1f} GB/s" for h, r in rates.items()) + ")"


def compiled_readers() -> dict[str, Callable[[torch.Tensor], int]]:
    """{"<n>-byte loads, <s> stream(s)": buffer -> OR of its words}: tide_read_bytes from the widest build this CPU
    runs (avx512f, avx2, else scalar); RuntimeError where it cannot be built here."""
    import ctypes

    from tide.experts.host_kernels import compile_library, cpu_features

    offered = cpu_features()
    build, width = ("avx512f", 64) if "avx512f" in offered else ("avx2", 32) if "avx2" in offered else ("scalar", 8)
    library = compile_library(build)
    library.tide_read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    library.tide_read_bytes.restype = ctypes.c_uint64
    return {f"{width}-byte loads, {s} stream{'s' if s > 1 else ''}":
            lambda buf, s=s: library.tide_read_bytes(buf.data_ptr(), buf.numel() * buf.element_size(), s)
            for s in (1, 2, 4)}


def fma_rate(workers: int, build: str, rounds: int = 100_000_000, tries: int = 5) -> float:
    """Fused multiply-adds per second that `workers` threads reach together on the widest FMA lanes of `build`
    (tide_fma_peak in host_kernel.c): the compute ceiling of the FMA GEMMs (avx2, avx512) and of torch's. The best
    of `tries` (a ceiling: a slow try is the machine's noise, not the FMA units)."""
    import ctypes

    from tide.experts.host_kernels import compile_library

    library = compile_library(build)
    library.tide_fma_peak.argtypes = [ctypes.c_int64]
    lanes = library.tide_fma_peak(1000)
    seconds = min(timed(lambda _: library.tide_fma_peak(rounds), [None] * workers, 1) for _ in range(tries))
    return workers * rounds * 12 * lanes / seconds


def fma_build(kernel: str, offered: set[str]) -> str | None:
    """The build whose FMA lanes bound `kernel` (torch: the widest this CPU has); None for the kernels that compute
    on other units (AMX tiles, vdpbf16ps), whose ceiling this study does not measure."""
    from tide.experts.host_kernels import KERNELS

    if kernel == "torch":
        return "avx512f" if "avx512f" in offered else "avx2" if "avx2" in offered else None
    return KERNELS[kernel].build if KERNELS[kernel].build in ("avx2", "avx512f") else None


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
@click.option("--repeat", default=5, show_default=True, help="Timed layer-forwards per point (their median).")
@click.option("--rounds", default=3, show_default=True,
              help="Rounds of (read bandwidth, then every point); a cell is the median of its rounds' shares.")
@click.option("--kernels", default="torch,amx-bf16,avx512,avx512-bf16,avx2", show_default=True,
              help="Host kernels to measure, each in the dtypes it computes (those that cannot run here are skipped).")
@click.option("--out", default=None, help="Run directory (default: results/<date>-<host>-host-tier).")
def main(workers: int | None, tokens: str, misses: str, repeat: int, rounds: int, kernels: str,
         out: str | None) -> None:
    from tide.calibrate import host_curve, machine_stamp
    from tide.config import default_cpu_threads
    from tide.experts.host_kernels import KERNELS, cpu_features, host_kernel
    from tide.hub import atomic_write, new_run_dir

    workers = workers or default_cpu_threads()
    token_list = tuple(int(t) for t in tokens.split(","))
    run_dir = new_run_dir(out, "host-tier")
    picks = {str(d).removeprefix("torch."): host_kernel("auto", d, *SHAPES["mini"])[1]
             for d in (torch.bfloat16, torch.float32)}
    bandwidth, how = read_bandwidth(workers)
    offered = cpu_features()
    builds = {fma_build(k, offered) for k in kernels.split(",") if k in KERNELS or k == "torch"}
    peaks = {b: fma_rate(workers, b) for b in sorted(builds - {None}) if b in offered}  # builds named as features
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
                expert_bytes = 3 * H * I * dtype.itemsize
                peak = peaks.get(fma_build(name, offered))
                # Rounds of (yardstick, then the kernel) side by side: these VMs' read bandwidth drifts by 20-40%
                # within seconds, so each round's shares use the bandwidth measured just before it, and a cell is the
                # median of its rounds' shares.
                per_round = []
                for _ in range(rounds):
                    near = read_bandwidth(workers, repeats=3)[0]
                    yardsticks.append(near)
                    curve = host_curve(H, I, dtype, workers, token_list, repeat, kernel, experts=miss,
                                       pool=-(-POOL_BYTES // expert_bytes))
                    per_round.append((near, dict(curve)))
                for n in token_list:
                    seconds = statistics.median(c[n] for _, c in per_round)
                    rate = expert_bytes * workers / seconds  # workers experts in flight at once
                    shares = [expert_bytes * workers / c[n] / near for near, c in per_round]
                    # each weight is n multiply-adds: at the FMA peak the weights stream at peak x itemsize / n
                    fma_bound = peak * dtype.itemsize / n if peak else None
                    roofs = [expert_bytes * workers / c[n] / min(near, fma_bound) for near, c in per_round] \
                        if fma_bound else None
                    rows.append({"shape": shape, "dtype": str(dtype).removeprefix("torch."), "kernel": name,
                                 "miss_set": miss, "tokens": n, "workers": workers, "rounds": rounds,
                                 "s_per_expert_per_worker": seconds, "weights_GBps": rate / 1e9,
                                 "read_GBps": statistics.median(near for near, _ in per_round) / 1e9,
                                 "share_of_read_bw": statistics.median(shares),
                                 "share_min": min(shares), "share_max": max(shares),
                                 "fma_bound_GBps": fma_bound / 1e9 if fma_bound else None,
                                 "share_of_roofline": statistics.median(roofs) if roofs else None})
                    print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    atomic_write(run_dir / "host_tier.csv", lambda tmp: df.to_csv(tmp, index=False))
    stamp = machine_stamp("cpu", workers)
    env = {"command": "python -m tide.bench.host_tier " + " ".join(sys.argv[1:]), "machine": stamp,
           "workers": workers, "read_bandwidth_GBps": bandwidth / 1e9, "read_bandwidth_how": how, "auto": picks,
           "read_bandwidth_beside_each_GBps": [round(y / 1e9, 2) for y in yardsticks],
           "fma_peak_GMACps": {b: round(r / 1e9, 1) for b, r in peaks.items()}}
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2))
    table = df.pivot_table(index=["shape", "dtype", "kernel", "miss_set"], columns="tokens",
                           values="share_of_read_bw")
    lines = ["# Host tier: weight bytes per second against the read bandwidth", "", f"Command: `{env['command']}`  ",
             f"Commit: {stamp['commit']}  ", f"Machine: CPU {stamp['cpu']}, torch {stamp['torch']}, {workers} "
             f"host-expert worker(s)", "",
             f"*Measured*: read bandwidth {bandwidth / 1e9:.1f} GB/s at the start ({workers} worker(s), each reading "
             f"its own 1 GiB buffer; the fastest of: {how}), and again before each of {rounds} rounds of each "
             f"configuration (median {statistics.median(yardsticks) / 1e9:.1f}, range {min(yardsticks) / 1e9:.1f}-"
             f"{max(yardsticks) / 1e9:.1f} GB/s). "
             "Each cell: the median over the rounds of the host tier's weight bytes per second (experts "
             "computed as the executor computes them: its workers, hand-off and staging, `miss_set` distinct experts "
             f"per layer-forward, n tokens each, cycling through {POOL_BYTES >> 30} GiB of experts so the weights "
             "come from memory) over the bandwidth measured just before; `host_tier.csv` has each cell's range over "
             "the rounds. Columns: tokens per expert.",
             "", "*Measured*: the FMA peak of the same workers together (tide_fma_peak, 12 independent chains): "
             + (", ".join(f"{b} {r / 1e9:.1f} G multiply-adds/s" for b, r in peaks.items()) or "none measured")
             + ". At n tokens each weight is n multiply-adds, so no FMA kernel streams weights faster than peak x "
             "bytes per weight / n: the *roofline* is the lesser of that and the read bandwidth (the second table; "
             "amx-bf16 and avx512-bf16 compute on other units and have none here).",
             "", *[f"`--host-kernel auto` here, {d}: {note}  " for d, note in picks.items()],
             *([""] + [f"Not measured: {s}" for s in sorted(set(skipped))] if skipped else []), "",
             "| shape | dtype | kernel | miss set | " + " | ".join(f"{n} tok" for n in table.columns) + " |",
             "|" + "---|" * (4 + len(table.columns))]
    for (shape, dtype, name, miss), values in table.iterrows():
        lines.append(f"| {shape} | {dtype} | {name} | {miss} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    roof = df.pivot_table(index=["shape", "dtype", "kernel", "miss_set"], columns="tokens",
                          values="share_of_roofline") if df["share_of_roofline"].notna().any() else None
    if roof is not None:
        lines += ["", "Share of the roofline (the lesser of the read bandwidth and the FMA bound):", "",
                  "| shape | dtype | kernel | miss set | " + " | ".join(f"{n} tok" for n in roof.columns) + " |",
                  "|" + "---|" * (4 + len(roof.columns))]
        for (shape, dtype, name, miss), values in roof.iterrows():
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
