"""The engine's device: validated and given an index once, at the edge (CLI options, `load`, `calibrate`, TideLM).

torch.cuda.set_device, memory queries, streams and events want an indexed device: "cuda" alone is refused by
`set_device` ("Expected a torch.device with a specified index"). Here "cuda" becomes "cuda:<current device>",
so nothing below the edge ever meets an unindexed CUDA device. Owns nothing else.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as an indexed torch.device (cpu, or cuda:N that exists), or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: TIDE runs on cpu or cuda (a {dev.type} device holds no runnable data)")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)
