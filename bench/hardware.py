"""The stamp every benchmark row carries: the machine, the software and the commit (measured where run)."""

from __future__ import annotations

from tide.calibrate import machine_stamp


def stamp(device: str, cpu_threads: int) -> dict[str, object]:
    s = machine_stamp(device, cpu_threads)
    return {f"hw_{k}": v for k, v in s.items()}
