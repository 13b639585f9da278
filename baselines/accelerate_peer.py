"""accelerate: the routed experts driven through Hugging Face accelerate's own offload, the outside peer.

The one baseline that bypasses our executor and store placement. The experts become ordinary nn.Modules
(parameters are views of the store's host rows: no copy), accelerate's `infer_auto_device_map` places them
under the same byte budget (`max_memory`), and `dispatch_model` attaches its hooks: offloaded experts have
their weights copied to the execution device on every call and dropped after, which is accelerate's design.
On a CPU-only machine `cpu_offload` installs the same hooks with the CPU as execution device.
Same output contract as MoEExecutor: same swiglu, same sort-and-scatter combine. Measured as accelerate runs
it, nothing scoped out: its `set_module_tensor_to_device` empties the CUDA cache on every offloaded parameter
load (accelerate 1.x, `clear_cache=True`), so its time includes that allocator churn. `close()` removes the
hooks and drops the bank, so its device copies are freed before the next policy's tier is allocated.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor, nn

from tide.counters import Counters, LayerStep
from tide.experts.executor import combine, group_by_expert, swiglu
from tide.experts.store import ExpertStore
from tide.policy import Plan, PolicyContext, StepInfo, register_policy


class Expert(nn.Module):
    def __init__(self, gate_up: Tensor, down: Tensor) -> None:
        super().__init__()
        self.gate_up, self.down = nn.Parameter(gate_up, requires_grad=False), nn.Parameter(down, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.gate_up, self.down)


class AccelerateExecutor:
    def __init__(self, store: ExpertStore, policy: AcceleratePeer) -> None:
        from accelerate import cpu_offload, dispatch_model, infer_auto_device_map

        self.store, self.policy = store, policy
        self.bank = nn.ModuleDict({str(layer): nn.ModuleList(Expert(*store.host_weights(layer, e))
                                                             for e in range(store.num_experts))
                                   for layer in store.layers})
        self.counters = Counters()
        self.timing = False  # accepted for the engine; this peer times only its whole call (moe_s)
        self.kernel_log: list[tuple[StepInfo, int, str]] | None = None  # as MoEExecutor's: every expert runs swiglu
        device = store.device
        if device.type == "cpu":
            cpu_offload(self.bank, execution_device=device)
            self.on_device: set[str] = set()
        else:
            budget = store.slots * len(store.layers) * store.expert_bytes
            index = device.index if device.index is not None else torch.cuda.current_device()
            device_map = infer_auto_device_map(self.bank, max_memory={index: budget, "cpu": 1 << 50},
                                               no_split_module_classes=["Expert"])
            dispatch_model(self.bank, device_map=device_map, main_device=device)
            self.on_device = {name for name, d in device_map.items() if d not in ("cpu", "disk")}

    def _resident(self, layer: int, e: int) -> bool:
        names = (f"{layer}.{e}", str(layer), "")
        return any(n in self.on_device for n in names)

    def warm_start(self) -> None:
        pass

    @torch.no_grad()
    def __call__(self, layer: int, x: Tensor, ids: Tensor, weights: Tensor, at: StepInfo) -> Tensor:
        t0 = time.perf_counter()
        N, k = ids.shape
        counts_list = torch.bincount(ids.reshape(-1), minlength=self.store.num_experts).tolist()
        order, ranges = group_by_expert(ids, counts_list)
        xs = x[order // k]
        out = torch.empty_like(xs)
        experts = self.bank[str(layer)]
        moved = 0
        for e, (s, t) in ranges.items():
            moved += not self._resident(layer, e)
            out[s:t] = experts[e](xs[s:t])  # accelerate's hook loads offloaded weights for this call
        if self.kernel_log is not None:
            self.kernel_log += [(replace(at, layer=layer), e, "swiglu") for e in ranges]
        result = combine(out, weights, order, x.dtype)
        self.counters.add_expert_tokens(layer, {e: c for e, c in enumerate(counts_list) if c})
        self.counters.records.append(LayerStep(
            at.block, at.step, layer, at.kind, len(ranges), N * k, 0, moved, 0, moved * self.store.expert_bytes,
            N * k, 0, moe_s=time.perf_counter() - t0))
        return result

    def finish(self) -> Counters:
        if self.store.device.type == "cuda":
            torch.cuda.synchronize()
        return self.counters

    def close(self) -> None:
        """Remove accelerate's hooks (they form reference cycles) and drop the bank with its device copies."""
        from accelerate.hooks import remove_hook_from_module

        if self.bank is not None:
            remove_hook_from_module(self.bank, recurse=True)
            self.bank = None


@register_policy("accelerate")
class AcceleratePeer:
    """Marks the peer in the registry; `build_executor` replaces MoEExecutor for it."""

    device_tier = False  # the store allocates no slots: accelerate manages device memory itself

    def __init__(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def build_executor(self, store: ExpertStore, cpu_threads: int) -> AccelerateExecutor:
        return AccelerateExecutor(store, self)

    def warm_start(self, layer: int) -> frozenset[int]:
        return frozenset()

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        raise RuntimeError("the accelerate peer does not plan: its own executor runs accelerate's hooks")
