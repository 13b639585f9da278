"""The cost model: seconds for one expert's copy, CPU compute and GPU compute, and the overlap between them.

Owns CostModel (measured by `tide calibrate`, or a labelled estimate) and its JSON form. Pure arithmetic:
knows nothing about models, tensors or policies beyond a Plan's integer sets.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tide.policy import Plan


def interpolate(curve: tuple[tuple[int, float], ...], n: float) -> float:
    """Piecewise-linear through measured (tokens, seconds) points; flat below, linear beyond the last two."""
    xs = [p[0] for p in curve]
    if n <= xs[0]:
        return curve[0][1]
    i = min(bisect.bisect_left(xs, n), len(xs) - 1)
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    return y0 + (y1 - y0) * (n - x0) / (x1 - x0)


@dataclass(frozen=True)
class CostModel:
    expert_bytes: int
    h2d_bytes_per_s: float  # pinned host -> device, at expert size
    h2d_fixed_s: float  # per copy: launch + latency
    cpu_curve: tuple[tuple[int, float], ...]  # (tokens, seconds) of one expert on the host, ascending tokens
    gpu_curve: tuple[tuple[int, float], ...]  # same on the device tier
    source: str = "measured"  # "measured" on `host`, or "estimate" (from published bandwidths; say which)
    host: dict = field(default_factory=dict)  # machine stamp: GPU, CPU, threads, torch
    shape: dict = field(default_factory=dict)  # hidden_size, moe_intermediate_size, dtype it was measured for
    cpu_workers: int = 1  # host-expert workers the cpu curve was measured with (and the executor runs)

    def __post_init__(self) -> None:
        for name in ("cpu_curve", "gpu_curve"):
            curve = getattr(self, name)
            if len(curve) < 2 or any(a[0] >= b[0] for a, b in zip(curve, curve[1:], strict=False)):
                raise ValueError(f"cost model field {name!r} needs >= 2 points with ascending token counts")
        if self.h2d_bytes_per_s <= 0 or self.expert_bytes <= 0:
            raise ValueError("cost model fields 'h2d_bytes_per_s' and 'expert_bytes' must be positive")

    def fetch_s(self) -> float:
        return self.h2d_fixed_s + self.expert_bytes / self.h2d_bytes_per_s

    def cpu_s(self, tokens: int) -> float:
        return interpolate(self.cpu_curve, tokens)

    def gpu_s(self, tokens: int) -> float:
        return interpolate(self.gpu_curve, tokens)

    def layer_step_s(self, plan: Plan, counts: Mapping[int, int], prefetched: int = 0) -> float:
        """Modelled wall time of one layer's routed experts in one forward, as the executor runs them.

        own = (|fetch| + |stream|) * fetch_s, in sequence on the copy stream; then `prefetched` copies for the
        next layer follow on the same stream;
        gpu_hit = sum gpu_s(n) over experts resident before the plan (runs while the copies land);
        gpu_new = sum gpu_s(n) over fetched/streamed routed experts (each after its own copy);
        cpu = makespan of cpu_s(n) over plan.cpu on `cpu_workers` workers (host_s), in parallel with the device.
        time = max(max(own, gpu_hit) + gpu_new, own + prefetched * fetch_s, cpu)
        (the max of parallel parts, the sum of serial ones)
        """
        moved = plan.fetch | plan.stream
        own = len(moved) * self.fetch_s()
        gpu_hit = sum(self.gpu_s(n) for e, n in counts.items() if e not in plan.cpu and e not in moved)
        gpu_new = sum(self.gpu_s(counts[e]) for e in moved if e in counts)
        cpu = self.host_s([counts[e] for e in plan.cpu])
        return max(max(own, gpu_hit) + gpu_new, own + prefetched * self.fetch_s(), cpu)

    def host_s(self, tokens: list[int]) -> float:
        """Makespan of these host experts on `cpu_workers` workers, each taking the next expert when free
        (longest first: the executor submits in expert order, within one expert of this)."""
        loads = [0.0] * max(1, self.cpu_workers)
        for t in sorted((self.cpu_s(n) for n in tokens), reverse=True):
            loads[loads.index(min(loads))] += t
        return max(loads)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> CostModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such hardware profile (write one with `tide calibrate`)")
        try:
            raw = json.loads(path.read_text())
            raw["cpu_curve"] = tuple(tuple(p) for p in raw["cpu_curve"])
            raw["gpu_curve"] = tuple(tuple(p) for p in raw["gpu_curve"])
            return cls(**raw)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a TIDE hardware profile ({type(err).__name__}: {err}); write one with "
                             "`tide calibrate`") from None

    def for_expert_bytes(self, expert_bytes: int) -> CostModel:
        """The same machine for another expert size: copy time scales with bytes; compute curves scale too."""
        scale = expert_bytes / self.expert_bytes
        scaled = tuple((n, s * scale) for n, s in self.cpu_curve), tuple((n, s * scale) for n, s in self.gpu_curve)
        return CostModel(expert_bytes, self.h2d_bytes_per_s, self.h2d_fixed_s, *scaled, self.source + " (rescaled)",
                         self.host, {**self.shape, "rescaled_from_bytes": self.expert_bytes}, self.cpu_workers)
