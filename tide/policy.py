"""The policy seam: what a placement policy sees (integers), what it returns (a Plan), and its checker.

Owns the Policy protocol, the Plan/StepInfo types, `check_plan` and the name registry. Policies decide;
they never touch tensors (the executor acts, the expert store owns memory). The registry is filled from
outside: `baselines/` and `tide/refresh.py` register themselves with `@register_policy`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

KINDS = ("denoise", "prefill", "commit")


@dataclass(frozen=True, slots=True)
class StepInfo:
    """Where we are when a MoE layer asks for a plan."""

    block: int  # absolute block index in the canvas
    step: int  # denoising step within the block, 0-based; for kind="commit", the steps the block took
    layer: int = -1  # MoE layer index (the model fills it in)
    kind: str = "denoise"  # "denoise" | "prefill" (prompt blocks into the KV cache) | "commit" (finished block)
    requests: int = 1  # requests in this forward (a batch's; block and step are then the batch's clock)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with one layer's routed experts in one forward. Applied as: evict, fetch, then compute.

    fetch:  copy host -> a free GPU slot and keep it resident afterwards.
    stream: copy into the shared staging ring, compute, drop (for work beyond the slots).
    evict:  forget resident slots (weights are read-only: nothing is copied back).
    cpu:    compute on the host this forward.
    """

    fetch: frozenset[int] = frozenset()
    stream: frozenset[int] = frozenset()
    evict: frozenset[int] = frozenset()
    cpu: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may know when it is built: shapes and, for profiling policies, routing counts."""

    num_experts: int
    moe_layers: tuple[int, ...]
    slots: int  # GPU slots per MoE layer
    popularity: Mapping[int, Mapping[int, int]] | None = None  # layer -> expert -> tokens, from a profiling run


class Policy(Protocol):
    name: ClassVar[str]

    def warm_start(self, layer: int) -> frozenset[int]:
        """Experts loaded into this layer's slots before decoding (not counted as decode traffic)."""
        ...

    def plan(self, at: StepInfo, counts: Mapping[int, int], resident: frozenset[int], slots: int) -> Plan:
        """counts: routed expert -> tokens routed to it in this forward (only experts with tokens)."""
        ...


POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} is registered twice")
        cls.name = name
        POLICIES[name] = cls
        return cls

    return wrap


def load_registered() -> dict[str, Callable[..., Policy]]:
    """Import the modules named by the `tide.policies` entry points (baselines, tide.refresh)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="tide.policies"):
        if ep.name not in POLICIES:
            ep.load()
    return POLICIES


def make_policy(name: str, ctx: PolicyContext, **options: Any) -> Policy:
    if name not in POLICIES:
        load_registered()
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; registered: {sorted(POLICIES)}")
    return POLICIES[name](ctx, **options)


class PlanError(RuntimeError):
    pass


def check_plan(plan: Plan, counts: Mapping[int, int], resident: frozenset[int], slots: int, who: str = "") -> None:
    """Raise PlanError unless `plan` is executable and covers every routed expert exactly once."""

    def fail(msg: str) -> None:
        raise PlanError(f"{who}: {msg}")

    if not plan.evict <= resident:
        fail(f"evicts non-resident experts {sorted(plan.evict - resident)}")
    kept = resident - plan.evict
    if plan.fetch & kept:
        fail(f"fetches already-resident experts {sorted(plan.fetch & kept)}")
    if len(kept) + len(plan.fetch) > slots:
        fail(f"needs {len(kept) + len(plan.fetch)} slots, has {slots}")
    on_gpu = kept | plan.fetch
    routed = frozenset(counts)
    for name, part in (("stream", plan.stream), ("cpu", plan.cpu)):
        if part & on_gpu:
            fail(f"{name} set overlaps the resident set: {sorted(part & on_gpu)}")
        if not part <= routed:
            fail(f"{name} set holds unrouted experts {sorted(part - routed)}")
    if plan.stream & plan.cpu:
        fail(f"experts both streamed and on the CPU: {sorted(plan.stream & plan.cpu)}")
    missing = routed - on_gpu - plan.stream - plan.cpu
    if missing:
        fail(f"routed experts not covered: {sorted(missing)}")
