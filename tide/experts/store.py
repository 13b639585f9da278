"""The expert store: owns all routed-expert memory. Decides nothing.

Host tier: per MoE layer one arena [E, P]; row e is expert e's contiguous buffer, packed as gate|up ([2I, H],
one matmul) then down ([H, I]), in this process's memory or in pages shared by the ranks of one machine (the
`master`, tide/experts/masters.py). With CUDA the arenas are pinned in place (cudaHostRegister on an ordinary
allocation), because torch's pinned allocator rounds every block up to a power of two: a 1.5 GiB mini layer
would take 2 GiB, flash's 200 GB of experts ~248 GiB. The host memory is checked before it is allocated.
Device tier: per layer `slots` preallocated rows, plus a small staging ring shared by all layers for
streamed experts. A fetch is one non-blocking copy on a dedicated copy stream that records an event; compute
waits on that event. Eviction only forgets a slot: weights are read-only, nothing is copied back. With
device "cpu" the same code runs with plain copies, so every test runs without a GPU.
Shape legend: E num_experts, I moe_intermediate_size, H hidden_size, P = 3*I*H elements.
"""

from __future__ import annotations

import ctypes
import weakref

import torch
from torch import Tensor

from tide.config import ModelConfig
from tide.experts.masters import PrivateMaster, SharedMaster
from tide.policy import Plan


class DeviceMemoryError(ValueError):
    """The memory asked for is not there; the message says how much is needed and free."""


def free_bytes(device: torch.device) -> int:
    """Free memory where `device` allocates: the GPU's (cudaMemGetInfo), else available host memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def clear_cuda_error() -> int | None:
    """Reset CUDA's last error (cudaGetLastError, through the process's own libcudart: torch's binding lacks it), so
    a failed runtime call is not reported by the next kernel launch as that launch's error. Returns the error it
    cleared, or None where libcudart is not loaded (then the error stays latched)."""
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcudart.so" in line), None)
    except OSError:
        return None
    return None if path is None else int(ctypes.CDLL(path).cudaGetLastError())


class Pinned:
    """Host memory page-locked in place (cudaHostRegister at its exact size). `release()` unregisters it; the owner's
    collection does too, as a fallback."""

    def __init__(self, t: Tensor, owner: object, what: str, read_only: bool = False) -> None:
        cudart = torch.cuda.cudart()
        self.ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        err = cudart.cudaHostRegister(self.ptr, nbytes, 8 if read_only else 0)  # 8: cudaHostRegisterReadOnly
        if int(err) != 0:
            clear_cuda_error()
            hint = ("raise the memlock limit (ulimit -l; in a container, --ulimit memlock=-1) or free host memory"
                    if int(err) == 2 else "this host cannot page-lock ordinary memory here")
            raise DeviceMemoryError(f"cannot page-lock {nbytes / 1e9:.2f} GB of host memory for {what}: "
                                    f"cudaHostRegister returned {int(err)} ({cudart.cudaGetErrorString(err)}); {hint}")
        self._finalizer = weakref.finalize(owner, Pinned._unregister, cudart, self.ptr)

    @staticmethod
    def _unregister(cudart, ptr: int) -> None:
        if int(cudart.cudaHostUnregister(ptr)) != 0:
            clear_cuda_error()  # e.g. at interpreter exit, after CUDA was torn down: nothing left to unpin

    def release(self) -> None:
        self._finalizer()  # runs once: a later release or the owner's collection does nothing


class ExpertStore:
    def __init__(self, cfg: ModelConfig, slots: int, device: torch.device | str, dtype: torch.dtype,
                 staging: int = 2, device_tier: bool = True,
                 master: PrivateMaster | SharedMaster | None = None) -> None:
        """device_tier=False allocates no device memory (for an executor that manages its own). `master`: where the
        host master lives (default: this process's memory); a process that does not fill it (`master.fills`) maps
        one another process filled."""
        self.device, self.dtype = torch.device(device), dtype
        self.layers = cfg.moe_layers
        self.num_experts = cfg.num_experts
        self.inter, self.hidden = cfg.moe_intermediate_size, cfg.hidden_size
        self.numel = cfg.expert_params
        self.expert_bytes = self.numel * torch.empty((), dtype=dtype).element_size()
        cuda = self.device.type == "cuda"
        self.master = master or PrivateMaster()
        need, free = len(self.layers) * self.num_experts * self.expert_bytes, free_bytes(torch.device("cpu"))
        if need > free and self.master.fills:  # one check per machine: the others map the same pages
            raise DeviceMemoryError(f"the host master of the routed experts needs {need / 1e9:.2f} GB of host "
                                    f"memory; {free / 1e9:.2f} GB is available")
        self.host = self.master.arenas(self.layers, self.num_experts, self.numel, dtype)
        self._pins = [Pinned(arena, self, f"the expert master of layer {layer}", self.master.read_only)
                      for layer, arena in self.host.items()] if cuda else []
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.gpu: dict[int, Tensor] = {}
        self.ring = torch.empty(0, self.numel, dtype=dtype, device=self.device)
        self.resize(slots, staging, device_tier)

    def resize(self, slots: int, staging: int = 2, device_tier: bool = True) -> None:
        """(Re)allocate the device tier: `slots` rows per layer and the staging ring. Residency is cleared.

        Transactional: the new tier is allocated beside the old one and swapped in; if that does not fit, the
        old tier is freed and the allocation tried once more; if that fails too, the store is left with an
        empty, consistent device tier and DeviceMemoryError says what was asked for.
        """
        if slots < 1:
            raise ValueError(f"slots per layer must be >= 1, got {slots}")
        if slots > self.num_experts:
            raise ValueError(f"slots per layer ({slots}) exceed num_experts ({self.num_experts})")
        self.sync()
        rows, ring_rows = (slots, max(1, staging)) if device_tier else (0, 0)
        try:
            gpu, ring = self._allocate(rows, ring_rows)
        except torch.OutOfMemoryError:
            self.gpu, self.ring = self._allocate(0, 0)  # drop the old tier and try once more
            self._forget(0)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            try:
                gpu, ring = self._allocate(rows, ring_rows)
            except torch.OutOfMemoryError:
                self.gpu, self.ring = self._allocate(0, 0)
                self._forget(0)
                need = (rows * len(self.layers) + ring_rows) * self.expert_bytes
                raise DeviceMemoryError(f"{slots} expert slots per layer need {need / 1e9:.2f} GB on {self.device}; "
                                        f"{free_bytes(self.device) / 1e9:.2f} GB is free there") from None
        self.gpu, self.ring = gpu, ring
        self._forget(slots)
        if self.copy_stream is not None:  # copies into the new tier start after its allocation on the compute stream
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def _allocate(self, rows: int, ring_rows: int) -> tuple[dict[int, Tensor], Tensor]:
        gpu = {layer: torch.empty(rows, self.numel, dtype=self.dtype, device=self.device) for layer in self.layers}
        return gpu, torch.empty(ring_rows, self.numel, dtype=self.dtype, device=self.device)

    def _forget(self, slots: int) -> None:  # empty residency and copy bookkeeping for `slots` rows per layer
        self.slots = slots
        I, H = self.inter, self.hidden  # per layer [slots, 2I, H] and [slots, H, I] views, for grouped GEMMs
        self.stacked = {layer: (g[:, : 2 * I * H].view(-1, 2 * I, H), g[:, 2 * I * H:].view(-1, H, I))
                        for layer, g in self.gpu.items()}
        self.slot_of: dict[int, dict[int, int]] = {layer: {} for layer in self.layers}
        self._free: dict[int, list[int]] = {layer: list(range(slots - 1, -1, -1)) for layer in self.layers}
        self._ready: dict[tuple, torch.cuda.Event] = {}  # (layer, slot) or ("ring", i) -> copy done
        self._ring_free: list[torch.cuda.Event | None] = [None] * self.ring.shape[0]  # compute done with buffer
        self._ring_next = 0

    # ---- filling the host master --------------------------------------------------------------------
    def put(self, layer: int, expert: int, gate: Tensor, up: Tensor, down: Tensor) -> None:
        """Pack one expert's checkpoint tensors into its host row (converting dtype once)."""
        I, H = self.inter, self.hidden
        for name, t, shape in (("gate_proj", gate, (I, H)), ("up_proj", up, (I, H)), ("down_proj", down, (H, I))):
            if tuple(t.shape) != shape:
                raise ValueError(f"layer {layer} expert {expert} {name}: shape {tuple(t.shape)}, expected {shape}")
        row = self.host[layer][expert]
        row[: I * H].view(I, H).copy_(gate)
        row[I * H: 2 * I * H].view(I, H).copy_(up)
        row[2 * I * H:].view(H, I).copy_(down)

    def views(self, row: Tensor) -> tuple[Tensor, Tensor]:
        """(gate_up [2I, H], down [H, I]) views of one packed row."""
        I, H = self.inter, self.hidden
        return row[: 2 * I * H].view(2 * I, H), row[2 * I * H:].view(H, I)

    def host_weights(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        return self.views(self.host[layer][expert])

    # ---- residency ----------------------------------------------------------------------------------
    def resident(self, layer: int) -> frozenset[int]:
        return frozenset(self.slot_of[layer])

    def apply(self, layer: int, plan: Plan) -> None:
        """Evict, then issue one copy per fetched expert on the copy stream (in id order)."""
        slot_of, free = self.slot_of[layer], self._free[layer]
        if self.copy_stream is not None and plan.fetch:
            # A freed slot may still be read by queued compute: copies start after it.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        for e in sorted(plan.evict):
            free.append(slot_of.pop(e))
        for e in sorted(plan.fetch):
            slot = free.pop()
            slot_of[e] = slot
            self._copy(self.gpu[layer][slot], self.host[layer][e], (layer, slot))

    def warm(self, layer: int, experts: frozenset[int]) -> None:
        """Load a starting resident set (start-up traffic, not decode traffic)."""
        self.apply(layer, Plan(evict=self.resident(layer), fetch=frozenset(experts)))
        self.sync()

    def gpu_weights(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        """Weights of a resident expert; the current stream waits for its copy if one is in flight."""
        slot = self.slot_of[layer][expert]
        event = self._ready.pop((layer, slot), None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return self.views(self.gpu[layer][slot])

    def wait_slots(self, layer: int, experts: list[int]) -> None:
        """The current stream waits for every copy still in flight into these experts' slots (no host sync)."""
        for e in experts:
            event = self._ready.pop((layer, self.slot_of[layer][e]), None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)

    def stream_in(self, layer: int, expert: int) -> tuple[tuple[Tensor, Tensor], int]:
        """Copy an expert into the next staging buffer; returns its weights and the buffer index.

        The caller computes with them and then calls `stream_done(index)`.
        """
        i = self._ring_next
        self._ring_next = (i + 1) % self.ring.shape[0]
        done = self._ring_free[i]
        if done is not None and self.copy_stream is not None:
            self.copy_stream.wait_event(done)  # do not overwrite a buffer still being read
        self._copy(self.ring[i], self.host[layer][expert], ("ring", i))
        event = self._ready.pop(("ring", i), None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        return self.views(self.ring[i]), i

    def stream_done(self, index: int) -> None:
        if self.copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._ring_free[index] = event

    def _copy(self, dst: Tensor, src: Tensor, key: tuple) -> None:
        if self.copy_stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)  # pinned source: a true async H2D copy
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._ready[key] = event

    def close(self) -> None:
        """Unpin the host master once no copy can still read it (the copy stream is synchronised first)."""
        self.sync()
        for pin in self._pins:
            pin.release()
        self._pins = []

    def sync(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        self._ready = {}

    @property
    def device_bytes(self) -> int:
        """Bytes of expert memory on the device tier (slots of every layer + the staging ring)."""
        return (sum(g.shape[0] for g in self.gpu.values()) + self.ring.shape[0]) * self.expert_bytes
