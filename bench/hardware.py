"""The stamp every benchmark row carries (the machine, the software and the commit, measured where run), and the
dispatched-op counter the device-tier checks use."""

from __future__ import annotations

from collections.abc import Callable

from tide.calibrate import machine_stamp


def stamp(device: str, cpu_threads: int) -> dict[str, object]:
    s = machine_stamp(device, cpu_threads)
    return {f"hw_{k}": v for k, v in s.items()}


def count_ops(fn: Callable[[], object]) -> int:
    """Aten ops dispatched while `fn` runs (each is at least one kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return len(seen)
