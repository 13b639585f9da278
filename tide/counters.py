"""Counters: what the executor did, per (forward, MoE layer), with units in every name.

Owns the records and their sums. Timing is honest on CUDA: device spans are CUDA events resolved after a
synchronize in `resolve()`, host spans are perf_counter. Knows nothing about models or policies.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class LayerStep:
    block: int
    step: int
    layer: int
    kind: str
    routed_experts: int  # unique experts with >= 1 token
    routed_pairs: int  # (token, expert) pairs
    fetched_experts: int  # copied into a slot and kept
    streamed_experts: int  # copied into the staging ring and dropped
    evicted_experts: int
    bytes_h2d: int
    pairs_gpu: int  # (token, expert) pairs computed on the GPU tier
    pairs_cpu: int
    prefetched_experts: int = 0  # the next layer's experts copied during this layer (counted in bytes_h2d)
    cpu_experts: int = 0  # experts computed on the host tier (pairs_cpu / cpu_experts = its tokens per expert)
    fetch_s: float = 0.0  # copy time (CUDA events on the copy stream; host time on CPU)
    gpu_expert_s: float = 0.0
    cpu_expert_s: float = 0.0  # worker wall time
    moe_s: float = 0.0  # whole executor call: host wall time on CPU; on CUDA, compute-stream time between events


class Spans:
    """Named time spans. CUDA spans are event pairs on a stream, read only after a synchronize, and recorded only
    while `enabled` (timed runs), so untimed work never piles up events; host spans are perf_counter."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.enabled = False
        self._pending: list[tuple[LayerStep, str, object, object]] = []

    def begin(self, stream: torch.cuda.Stream | None = None) -> object:
        if not self.cuda:
            return time.perf_counter()
        if not self.enabled:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record(stream)
        return start

    def end(self, record: LayerStep, name: str, start: object, stream: torch.cuda.Stream | None = None) -> None:
        if start is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            self._pending.append((record, name, start, end))
        else:
            setattr(record, name, getattr(record, name) + time.perf_counter() - start)

    @contextmanager
    def span(self, record: LayerStep, name: str, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
        start = self.begin(stream)
        yield
        self.end(record, name, start, stream)

    def resolve(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            for record, name, start, end in self._pending:
                setattr(record, name, getattr(record, name) + start.elapsed_time(end) / 1e3)
            self._pending.clear()


@dataclass
class Counters:
    records: list[LayerStep] = field(default_factory=list)
    expert_tokens: dict[int, dict[int, int]] = field(default_factory=dict)  # layer -> expert -> tokens routed

    def add_expert_tokens(self, layer: int, counts: dict[int, int]) -> None:
        per = self.expert_tokens.setdefault(layer, {})
        for e, c in counts.items():
            per[e] = per.get(e, 0) + c

    def totals(self) -> dict[str, float]:
        skip = {"block", "step", "layer", "kind"}
        out = {f.name: sum(getattr(r, f.name) for r in self.records) for f in fields(LayerStep) if f.name not in skip}
        pairs = out["pairs_gpu"] + out["pairs_cpu"]
        out["gpu_hit_ratio"] = out["pairs_gpu"] / pairs if pairs else 1.0  # token-weighted
        return out

    def forwards(self) -> int:
        """Model forwards seen (every forward passes each MoE layer once: the records of the first one)."""
        first = min((r.layer for r in self.records), default=None)
        return sum(r.layer == first for r in self.records)

    def routed_tokens_per_layer(self) -> dict[int, int]:
        per: dict[int, int] = {}
        for r in self.records:
            per[r.layer] = per.get(r.layer, 0) + r.routed_pairs
        return per

    def rows(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def clear(self) -> None:
        self.records.clear()
        self.expert_tokens.clear()
