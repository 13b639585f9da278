"""Calibration: measure a CostModel on this machine, or build a labelled estimate from published rates.

Owns the microbenchmarks (pinned H2D copy of one expert, one expert's SwiGLU on the host and on the
device tier for n tokens) and the machine stamp every result carries. Timings are medians after warm-up
(on a GPU ~200 ms of it, so clocks leave idle); device regions are bracketed by CUDA events, host regions by
perf_counter. Host experts are timed as the executor runs them: `cpu_threads` single-threaded workers, each
taking whole experts from a queue of distinct ones, so the curve is a worker's time per expert under the
contention of the others, and the cost model takes the host tier's makespan over the workers.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from tide.cost import CostModel
from tide.device import resolve_device
from tide.experts.executor import swiglu
from tide.experts.host_kernels import host_kernel as choose_host_kernel
from tide.hub import source_stamp

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BULK_COPY_BYTES = 64 << 20  # the bandwidth is timed on copies this large: a tiny expert's copy is all fixed cost


def cpu_model() -> str:
    """The CPU's model name. Ours, not py-cpuinfo (a dependency for one line of /proc/cpuinfo) or torch's
    collect_env (it runs pip, nvidia-smi and other subprocesses: seconds per stamp)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_stamp(device: str = "cpu", cpu_threads: int | None = None) -> dict:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(torch.device(device)) if cuda else None,
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_threads": cpu_threads, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "device": device, "hostname": platform.node(), "commit": source_stamp()}


def median_s(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of `repeats` calls after warm-up; CUDA calls timed by events on the current stream. Ours,
    not torch.utils.benchmark.Timer: `repeats` is the user's --repeats (blocked_autorange picks its own count and
    reports blocks, not calls), and the copies timed here are asynchronous ones a block would overlap."""
    cuda = device.type == "cuda"
    until = time.perf_counter() + (0.2 if cuda else 0.0)
    while warmup > 0 or time.perf_counter() < until:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        warmup -= 1
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibrate(hidden_size: int, moe_intermediate_size: int, dtype: torch.dtype, device: str = "cpu",
              cpu_threads: int = 1, tokens: tuple[int, ...] = TOKENS, repeats: int = 20,
              host_kernel: str = "auto") -> CostModel:
    """Measure copy and compute costs of one expert of this shape on this machine (host experts with the host
    kernel an engine given `host_kernel` would use)."""
    dev = resolve_device(device)
    H, I = hidden_size, moe_intermediate_size
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.set_device(dev)  # events and streams below are the current device's
    host = torch.randn(3 * I * H, dtype=torch.float32).to(dtype)
    if cuda:
        host = host.pin_memory()
    nbytes = host.numel() * host.element_size()
    # bandwidth from a bulk copy of whole experts (at least BULK_COPY_BYTES), the fixed cost from a 1024-value
    # copy: a copy of one tiny expert takes no longer than the fixed cost, and bytes over that difference would
    # be a made-up figure
    bulk = host.repeat(max(1, -(-BULK_COPY_BYTES // nbytes)))
    if cuda:
        bulk = bulk.pin_memory()
    bulk_dst = torch.empty_like(bulk, device=dev)
    tiny_src, tiny_dst = bulk[:1024], bulk_dst[:1024]
    bulk_s = median_s(lambda: bulk_dst.copy_(bulk, non_blocking=True), dev, repeats)
    fixed_s = median_s(lambda: tiny_dst.copy_(tiny_src, non_blocking=True), dev, repeats)
    h2d = bulk.numel() * bulk.element_size() / bulk_s

    def curve(weights_device: torch.device) -> tuple[tuple[int, float], ...]:
        row = host.to(weights_device)
        gate_up, down = row[: 2 * I * H].view(2 * I, H), row[2 * I * H:].view(H, I)
        points = []
        for n in tokens:
            x = torch.randn(n, H, dtype=torch.float32).to(dtype).to(weights_device)
            points.append((n, median_s(lambda x=x: swiglu(x, gate_up, down), weights_device, repeats)))
        return tuple(points)

    gpu_curve = curve(dev) if cuda else None
    kernel, _ = choose_host_kernel(host_kernel, dtype, H, I)
    cpu_curve = host_curve(H, I, dtype, cpu_threads, tokens, repeats, kernel)
    return CostModel(nbytes, h2d, fixed_s, cpu_curve, gpu_curve or cpu_curve, "measured",
                     machine_stamp(device, cpu_threads),
                     {"hidden_size": H, "moe_intermediate_size": I, "dtype": str(dtype).removeprefix("torch.")},
                     cpu_workers=cpu_threads)


def host_curve(H: int, I: int, dtype: torch.dtype, workers: int, tokens: tuple[int, ...], repeats: int,
               kernel: Callable = swiglu, experts: int = 32, pool: int | None = None) -> tuple[tuple[int, float], ...]:
    """Seconds per host expert as the executor runs them: a MoEExecutor over `experts` distinct experts (more than
    fit the private caches), all on the host (its pool of `workers` single-threaded workers, its hand-off and
    staging), n tokens each; the measured host-tier span of a layer-forward times workers / experts. With `pool`
    experts in the store (more than the last-level cache holds), each layer-forward takes the next `experts` of
    them, so its weights come from memory as a real model's do."""
    from tide.config import preset
    from tide.experts.executor import MoEExecutor
    from tide.experts.store import ExpertStore
    from tide.policy import Plan, StepInfo

    class AllOnHost:  # a calibration probe, not a placement policy
        name = "calibration"

        def warm_start(self, layer: int) -> frozenset[int]:
            return frozenset()

        def plan(self, at, counts, resident, slots) -> Plan:
            return Plan(cpu=frozenset(counts))

    total = max(experts, pool or experts)
    cfg = preset("tiny", hidden_size=H, moe_intermediate_size=I, num_experts=total, num_experts_per_tok=1,
                 n_group=1, topk_group=1, num_hidden_layers=2)
    store = ExpertStore(cfg, 1, "cpu", dtype, device_tier=False)
    for arena in store.host.values():
        arena.normal_(std=0.02)
    executor = MoEExecutor(store, AllOnHost(), workers, kernel)
    layer, points, calls = store.layers[0], [], iter(range(10**9))
    for n in tokens:
        x, w = torch.randn(experts * n, H).to(dtype), torch.ones(experts * n, 1)

        def span(x=x, w=w, n=n) -> float:
            first = next(calls) * experts % total
            ids = ((torch.arange(experts) + first) % total).repeat_interleave(n)[:, None]
            executor(layer, x, ids, w, StepInfo(0, 0))
            return executor.counters.records.pop().cpu_expert_s

        for _ in range(3):
            span()
        points.append((n, statistics.median(span() for _ in range(repeats)) * workers / experts))
    executor.close()
    return tuple(points)


# Published rates for reference machines (vendor datasheets and the numbers in shared/design/tide.md).
# Estimates, never measurements: the CostModel says so in `source`.
REFERENCE_MACHINES = {
    "h100-pcie5": dict(gpu="NVIDIA H100 80GB (estimate)", cpu="48-core Xeon, DDR5 (estimate)", h2d_GBps=50.0,
                       dram_GBps=150.0, cpu_TFLOPs=2.0, hbm_GBps=3350.0, gpu_TFLOPs=800.0),
    "a100-pcie4": dict(gpu="NVIDIA A100 40GB (estimate)", cpu="48-core Xeon, DDR4 (estimate)", h2d_GBps=25.0,
                       dram_GBps=120.0, cpu_TFLOPs=1.5, hbm_GBps=1555.0, gpu_TFLOPs=312.0),
}
COPY_FIXED_S, CPU_CALL_S, GPU_CALL_S = 10e-6, 20e-6, 30e-6  # per copy / host expert / device expert (estimates)


def estimate(name: str, hidden_size: int, moe_intermediate_size: int, bytes_per_param: int = 2,
             tokens: tuple[int, ...] = TOKENS) -> CostModel:
    """A roofline estimate: t(n) = call overhead + max(weight bytes / bandwidth, FLOPs / rate)."""
    if name not in REFERENCE_MACHINES:
        raise ValueError(f"unknown reference machine {name!r}; choose one of {sorted(REFERENCE_MACHINES)}")
    m = REFERENCE_MACHINES[name]
    nbytes = 3 * hidden_size * moe_intermediate_size * bytes_per_param
    flops = 2 * 3 * hidden_size * moe_intermediate_size  # per token

    def curve(gbps: float, tflops: float, call_s: float) -> tuple[tuple[int, float], ...]:
        return tuple((n, call_s + max(nbytes / (gbps * 1e9), n * flops / (tflops * 1e12))) for n in tokens)

    return CostModel(nbytes, m["h2d_GBps"] * 1e9, COPY_FIXED_S, curve(m["dram_GBps"], m["cpu_TFLOPs"], CPU_CALL_S),
                     curve(m["hbm_GBps"], m["gpu_TFLOPs"], GPU_CALL_S), f"estimate from published rates ({name})",
                     {"gpu": m["gpu"], "cpu": m["cpu"], "reference_machine": name, **m},
                     {"hidden_size": hidden_size, "moe_intermediate_size": moe_intermediate_size,
                      "dtype": {2: "bfloat16", 4: "float32"}.get(bytes_per_param, str(bytes_per_param))})


def load_or_calibrate(profile_path: str | None, hidden_size: int, moe_intermediate_size: int, dtype: torch.dtype,
                      device: str = "cpu", cpu_threads: int = 1, host_kernel: str = "auto") -> CostModel:
    """The hardware profile at `profile_path` (rescaled to this expert size), else a quick calibration here."""
    nbytes = 3 * hidden_size * moe_intermediate_size * dtype.itemsize
    if profile_path:
        cost = CostModel.from_json(profile_path)
        return cost if cost.expert_bytes == nbytes else cost.for_expert_bytes(nbytes)
    return calibrate(hidden_size, moe_intermediate_size, dtype, device, cpu_threads, tokens=TOKENS[:9], repeats=5,
                     host_kernel=host_kernel)
