"""The executor: acts on one MoE layer's routing, as the policy planned, with the store's memory.

Per call: count tokens per expert (the layer's one device-to-host sync: the counts, copied once into pinned
memory) -> policy.plan -> check_plan -> store.apply -> host experts to the CPU worker pool (their activations
leave through a pinned buffer and an event the workers wait on; results return the same way, non-blocking)
-> device experts, resident or streamed, each through `swiglu` (the device kernel) -> join -> combine. Counters
are updated here and only here. Decides nothing about placement. Runs without autograd, whatever the caller's
grad mode (the workers' threads included: grad mode is per thread).

Losslessness by construction: every device-tier expert of every policy, resident or streamed, and of the
tier-matched replay, runs the same kernel (`swiglu`: one GEMM per projection over exactly that expert's rows),
so the same rows give the same bits whatever the placement (level a), and host experts run the engine's host
kernel, which the tier-matched reference replays (level b). `kernel_log` records which kernel ran each expert.
`device_kernel="grouped"` (opt-in) runs the resident experts as two grouped GEMMs per layer-forward (a fixed
number of ops); a grouped GEMM may tile a group differently depending on the others (CUTLASS on sm_90), so such
runs are promised level c only. The combine is sort-and-scatter in expert-id order followed by a fixed-order sum
over k, never index_add_ (whose CUDA atomics make the sum order, and so the rounding, vary run to run).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from tide.counters import Counters, LayerStep, Spans
from tide.experts.store import ExpertStore
from tide.policy import Policy, StepInfo, check_plan
from tide.trace import RoutingTrace


def group_by_expert(ids: Tensor, counts: list[int]) -> tuple[Tensor, dict[int, tuple[int, int]]]:
    """ids [N, k] -> (order [N*k]: pair indices sorted by expert id, stable; expert -> its row range)."""
    order = torch.argsort(ids.reshape(-1), stable=True)
    ranges, start = {}, 0
    for e, c in enumerate(counts):
        if c:
            ranges[e] = (start, start + c)
            start += c
    return order, ranges


def combine(out: Tensor, weights: Tensor, order: Tensor, dtype: torch.dtype) -> Tensor:
    """out [N*k, H] in expert order, weights [N, k] fp32 -> sum_k w * y, [N, H]: scatter, then fixed-order sum."""
    N, k = weights.shape
    contrib = out.float() * weights.reshape(-1)[order][:, None]
    y = torch.empty_like(contrib)
    y[order] = contrib  # unsort: each row written once, deterministic
    return y.view(N, k, -1).sum(dim=1).to(dtype)


def next_layer(layers: list[int], layer: int) -> int | None:
    i = layers.index(layer)
    return layers[i + 1] if i + 1 < len(layers) else None


def swiglu(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x [n, H], gate_up [2I, H], down [H, I] -> down(silu(gate x) * up x), [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


DEVICE_KERNELS = ("swiglu", "grouped")


def grouped_mm_works(store: ExpertStore) -> bool:
    """Whether torch's grouped GEMM runs natively on this device, dtype and slot-stacked layout (one small probe).
    On CUDA only bf16 on sm_90 and newer: elsewhere torch falls back to a loop that reads `offs` on the host, two
    syncs per call, which would break the one-sync-per-layer rule."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if store.device.type == "cuda" and (store.dtype != torch.bfloat16
                                        or torch.cuda.get_device_capability(store.device) < (9, 0)):
        return False
    I, H = store.inter, store.hidden
    probe = torch.zeros(2, 3 * I * H, dtype=store.dtype, device=store.device)
    gate_up = probe[:, : 2 * I * H].view(2, 2 * I, H)
    try:
        x = torch.zeros(3, H, dtype=store.dtype, device=store.device)
        torch._grouped_mm(x, gate_up.transpose(1, 2), offs=torch.tensor([1, 3], dtype=torch.int32,
                                                                          device=store.device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, cuda: bool) -> Tensor:
    """A staging tensor on the host: pinned with CUDA (torch's caching host allocator keeps a block until the
    copies that read or wrote it are done), plain memory otherwise."""
    return torch.empty(shape, dtype=dtype, pin_memory=cuda)


class MoEExecutor:
    def __init__(self, store: ExpertStore, policy: Policy, cpu_threads: int = 1,
                 host_kernel: Callable[[Tensor, Tensor, Tensor], Tensor] = swiglu,
                 device_kernel: str = "swiglu") -> None:
        """`host_kernel` computes host-tier experts (the same `swiglu` as the device tier unless a test or a
        faster host implementation supplies another: the tier-matched reference then uses it too).
        `device_kernel`: "swiglu" (every device expert alone: levels a and b by construction) or "grouped"."""
        if cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
        if device_kernel not in DEVICE_KERNELS:
            raise ValueError(f"device_kernel {device_kernel!r}: choose one of {', '.join(DEVICE_KERNELS)}")
        if device_kernel == "grouped" and not grouped_mm_works(store):
            raise ValueError(f"device_kernel 'grouped': torch has no native grouped GEMM for {store.dtype} on "
                             f"{store.device} (CUDA needs bf16 on sm_90 or newer): use 'swiglu'")
        self.store, self.policy, self.host_kernel = store, policy, host_kernel
        # Parallelism on the host comes from the workers: each computes its experts single-threaded, so
        # workers and the main thread never oversubscribe the cores with nested OpenMP teams.
        self.pool = ThreadPoolExecutor(max_workers=cpu_threads, thread_name_prefix="tide-cpu-expert",
                                       initializer=torch.set_num_threads, initargs=(1,))
        self.cpu_threads = cpu_threads
        self.counters = Counters()
        self.spans = Spans(store.device)
        self.trace: RoutingTrace | None = None  # set to record every layer-forward's routing
        self.host_log: list[tuple[StepInfo, frozenset[int]]] | None = None  # set to record each call's host experts
        self.kernel_log: list[tuple[StepInfo, int, str]] | None = None  # set to record (at, expert, kernel) per expert
        self.cuda = store.device.type == "cuda"
        self.syncs = 0  # host waits on the device issued by the calling thread (read_counts: one per layer-forward)
        self.device_kernel = device_kernel
        self.host_kernel_name = "host:" + getattr(host_kernel, "name", "torch")

    @property
    def timing(self) -> bool:
        return self.spans.enabled

    @timing.setter
    def timing(self, on: bool) -> None:
        self.spans.enabled = on

    def warm_start(self) -> None:
        for layer in self.store.layers:
            self.store.warm(layer, self.policy.warm_start(layer))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    @torch.no_grad()
    def __call__(self, layer: int, x: Tensor, ids: Tensor, weights: Tensor, at: StepInfo) -> Tensor:
        t0 = time.perf_counter()
        start = self.spans.begin() if self.cuda else None
        at = replace(at, layer=layer)
        store, policy = self.store, self.policy
        N, k = ids.shape
        counts_list = self.read_counts(ids.reshape(-1))  # the one device-to-host sync
        counts = {e: c for e, c in enumerate(counts_list) if c}
        if self.trace is not None:
            self.trace.add(at, counts)
        resident = store.resident(layer)
        plan = policy.plan(at, counts, resident, store.slots)
        check_plan(plan, counts, resident, store.slots, who=f"policy {policy.name!r}, layer {layer}")
        if self.host_log is not None:
            self.host_log.append((at, plan.cpu))
        rec = LayerStep(at.block, at.step, layer, at.kind, len(counts), N * k, len(plan.fetch), len(plan.stream),
                        len(plan.evict), (len(plan.fetch) + len(plan.stream)) * store.expert_bytes,
                        sum(c for e, c in counts.items() if e not in plan.cpu),
                        sum(counts[e] for e in plan.cpu), cpu_experts=len(plan.cpu))
        with self.spans.span(rec, "fetch_s", store.copy_stream):
            store.apply(layer, plan)
            rec.prefetched_experts = self._prefetch(layer, at)
            rec.bytes_h2d += rec.prefetched_experts * store.expert_bytes

        order, starts = group_by_expert(ids, counts_list)
        xs = x[order // k]  # [N*k, H] inputs in expert order
        out = torch.empty_like(xs)
        host = self._submit_host(layer, xs, sorted(plan.cpu), starts) if plan.cpu else None

        with self.spans.span(rec, "gpu_expert_s"):
            resident = sorted(set(counts) - plan.cpu - plan.stream)
            if self.device_kernel == "grouped" and resident:
                self._grouped(layer, xs, out, resident, starts)
            else:
                for e in resident:
                    s, t = starts[e]
                    out[s:t] = swiglu(xs[s:t], *store.gpu_weights(layer, e))
            for e in sorted(plan.stream):
                s, t = starts[e]
                w, buf = store.stream_in(layer, e)
                out[s:t] = swiglu(xs[s:t], *w)
                store.stream_done(buf)
        if self.kernel_log is not None:
            ran = [(e, self.device_kernel) for e in resident] + [(e, "swiglu") for e in plan.stream]
            self.kernel_log += [(at, e, k) for e, k in ran + [(e, self.host_kernel_name) for e in plan.cpu]]

        if host is not None:
            rows, y_host, futures = host
            spans = [f.result() for f in futures]  # re-raises a worker's exception here
            rec.cpu_expert_s = max(b for _, b in spans) - min(a for a, _ in spans)
            out[rows] = y_host.to(x.device, non_blocking=True)  # pinned source: an async copy

        result = combine(out, weights, order, x.dtype)
        self.counters.add_expert_tokens(layer, counts)
        if self.cuda:
            self.spans.end(rec, "moe_s", start)
        else:
            rec.moe_s = time.perf_counter() - t0
        self.counters.records.append(rec)
        return result

    def _grouped(self, layer: int, xs: Tensor, out: Tensor, experts: list[int], starts: dict[int, tuple[int, int]]):
        """Every resident expert of this layer-forward in two grouped GEMMs over the slot-stacked weights: a fixed
        number of ops however many experts (per-expert calls cost ~5 launches each). Rows are gathered in slot
        order; `offs` ends each slot's group (empty groups for idle slots)."""
        store = self.store
        slot_of = store.slot_of[layer]
        store.wait_slots(layer, experts)
        sizes = [0] * store.slots
        by_slot = sorted(experts, key=slot_of.__getitem__)
        for e in by_slot:
            sizes[slot_of[e]] = starts[e][1] - starts[e][0]
        index = [i for e in by_slot for i in range(*starts[e])]
        rows = self._to_device(torch.tensor(index, dtype=torch.int64), xs.device)
        offs = self._to_device(torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32), xs.device)
        gate_up, down = store.stacked[layer]  # [slots, 2I, H], [slots, H, I]
        gate, up = torch._grouped_mm(xs[rows], gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        out[rows] = torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)

    def _to_device(self, t: Tensor, device: torch.device) -> Tensor:
        """A small host tensor on the device without a sync: through pinned memory, non-blocking."""
        if not self.cuda:
            return t
        return t.pin_memory().to(device, non_blocking=True)

    def read_counts(self, flat_ids: Tensor) -> list[int]:
        """Tokens routed to each expert, on the host: counted on the device without a sync (scatter_add, not
        bincount, which syncs on CUDA), then copied once into pinned memory and waited for. That wait is the main
        thread's only one in a layer-forward; it is counted in `syncs` (CUDA's sync debug mode cannot see an event
        wait, so tests bound it exactly with this count and use the debug mode for every other kind)."""
        E = self.store.num_experts
        counts = torch.zeros(E, dtype=torch.int64, device=flat_ids.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        self.syncs += 1
        if not self.cuda:
            return counts.tolist()
        staged = host_buffer((E,), torch.int64, True)
        staged.copy_(counts, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return staged.tolist()

    def _submit_host(self, layer: int, xs: Tensor, experts: list[int], starts: dict[int, tuple[int, int]]):
        """Send the host experts' rows to the workers; returns (device row index, pinned results, futures).
        The rows leave through a pinned buffer filled by a non-blocking copy; each worker waits on its event."""
        index = [i for e in experts for i in range(*starts[e])]
        rows = host_buffer((len(index),), torch.int64, self.cuda)
        rows.copy_(torch.tensor(index, dtype=torch.int64))
        rows = rows.to(xs.device, non_blocking=True)
        x_host = host_buffer((len(index), xs.shape[1]), xs.dtype, self.cuda)
        x_host.copy_(xs[rows], non_blocking=True)  # activations only: KBs, not weights
        ready = None
        if self.cuda:
            ready = torch.cuda.Event()
            ready.record()
        y_host = host_buffer(tuple(x_host.shape), xs.dtype, self.cuda)
        jobs, at = [], 0
        for e in experts:
            n = starts[e][1] - starts[e][0]
            jobs.append((e, x_host[at:at + n], y_host[at:at + n]))
            at += n
        many = getattr(self.host_kernel, "many", None)
        if many is None:  # one task per expert
            futures = [self.pool.submit(self._host_expert, layer, e, x, y, ready) for e, x, y in jobs]
        else:  # one job shared by the workers: no per-expert hand-off (README, "Host kernels")
            job = many([(x, *self.store.host_weights(layer, e), y) for e, x, y in jobs])
            futures = [self.pool.submit(self._host_share, job, ready) for _ in range(min(self.cpu_threads, len(jobs)))]
        return rows, y_host, futures

    def _prefetch(self, layer: int, at: StepInfo) -> int:
        """Let the policy start the next MoE layer's copies now (they overlap this layer's compute)."""
        hook = getattr(self.policy, "prefetch", None)
        nxt = next_layer(self.store.layers, layer)
        if hook is None or nxt is None:
            return 0
        resident = self.store.resident(nxt)
        plan = hook(replace(at, layer=nxt), resident, self.store.slots)
        if plan is None:
            return 0
        check_plan(plan, {}, resident, self.store.slots, who=f"policy {self.policy.name!r} prefetch, layer {nxt}")
        self.store.apply(nxt, plan)
        return len(plan.fetch)

    @torch.no_grad()  # grad mode is per thread: the workers do not inherit the caller's
    def _host_expert(self, layer: int, expert: int, x: Tensor, y: Tensor, ready) -> tuple[float, float]:
        if ready is not None:
            ready.synchronize()  # this worker waits for the activations' copy; the main thread does not
        t0 = time.perf_counter()
        y.copy_(self.host_kernel(x, *self.store.host_weights(layer, expert)))
        return t0, time.perf_counter()

    @staticmethod
    def _host_share(job: Callable[[], None], ready) -> tuple[float, float]:
        """A worker's part of a shared host job (a kernel's `many`): it computes experts until none is left."""
        if ready is not None:
            ready.synchronize()
        t0 = time.perf_counter()
        job()
        return t0, time.perf_counter()

    def finish(self) -> Counters:
        """Synchronise and resolve device timings; returns the counters."""
        self.store.sync()
        self.spans.resolve()
        return self.counters
