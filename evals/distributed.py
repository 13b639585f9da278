"""Data parallelism the way lm-eval defines it, over torch.distributed (issue 23).

A launcher people know (`torchrun --nproc-per-node N`, `accelerate launch --num_processes N`, or `tide eval
--nproc N`, which starts itself through `torch.distributed.run`) sets RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE; each process joins the default process group (NCCL on CUDA, gloo on the CPU), runs one engine
on `cuda:LOCAL_RANK` (or the CPU), and lm-eval shards the requests by rank and gathers the results to rank 0
through the model's `all_gather`, `gather_object` and `barrier`. Nothing here launches, schedules or calls
remotely: that is torch's launcher and torch.distributed.

One host master per machine: the local ranks of a machine share one copy of the routed experts in shared memory
(`shared_master`: tide.experts.masters.SharedMaster in `--shm-dir`, default /dev/shm), filled by local rank 0.

A rank that raises ends its process; torchrun's agent then stops the others (so no rank waits forever), and a
collective that never completes fails after the process group's timeout (`TIDE_DIST_TIMEOUT_S`, default 600 s).
torch is imported inside the functions: entry points read the launcher's environment before torch loads.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

DEFAULT_SHM_DIR = "/dev/shm"

DEFAULT_TIMEOUT_S = 600.0
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1


ONE = Group()  # a single process


def from_env(environ: dict[str, str] | None = None) -> Group:
    """The group a launcher describes in the environment; errors name the variable."""
    env = os.environ if environ is None else environ
    values = {}
    for name in ENV:
        raw = env.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r}: expected an integer (set by torchrun or "
                             "accelerate launch)") from None
    world = values.get("WORLD_SIZE", 1)
    rank = values.get("RANK", 0)
    if world > 1 and "LOCAL_RANK" not in values:
        raise ValueError(f"WORLD_SIZE={world} but LOCAL_RANK is not set: start the processes with torchrun or "
                         "accelerate launch, which set both")
    local, local_world = values.get("LOCAL_RANK", 0), values.get("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if not 0 <= local < local_world <= world:
        raise ValueError(f"LOCAL_RANK={local} and LOCAL_WORLD_SIZE={local_world}: need 0 <= LOCAL_RANK < "
                         f"LOCAL_WORLD_SIZE <= WORLD_SIZE={world}")
    return Group(rank, world, local, local_world)


def timeout_s(environ: dict[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get("TIDE_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"TIDE_DIST_TIMEOUT_S={raw!r}: expected seconds > 0")
    return value


def join(device: str) -> Group:
    """Join the default process group when launched with more than one rank (once per process)."""
    import torch
    import torch.distributed as dist

    group = from_env()
    if group.active and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    return group


def relaunch(nproc: int, argv: list[str]) -> int:
    """`tide ARGV` again under torch's own launcher (`python -m torch.distributed.run --standalone --nproc-per-node
    N -m tide.cli ARGV`, the --nproc option taken out), one process per rank; returns the launcher's exit code."""
    import subprocess
    import sys

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    # --standalone: a free port and a fresh run id, so two such runs on one machine neither collide on torchrun's
    # default port nor share a host-master directory
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
           "tide.cli", *args]
    return subprocess.run(cmd).returncode


def rank_device(device: str, group: Group) -> str:
    """One GPU per process, as torchrun's --nproc-per-node means: any CUDA device becomes cuda:LOCAL_RANK under
    several ranks (lm-eval's --device default, cuda:0, included); the CPU stays the CPU."""
    import torch

    if not group.active or not device.startswith("cuda"):
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and group.local_rank >= count:
        raise ValueError(f"LOCAL_RANK {group.local_rank}: this machine has {count} GPU(s); start at most {count} "
                         "processes per node (--nproc-per-node)")
    return f"cuda:{group.local_rank}"


def all_gather(tensor, group: Group):
    """Every rank's tensor (same shape on each), concatenated along dim 0 in rank order (0-dim: stacked)."""
    import torch
    import torch.distributed as dist

    if not group.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group.world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)


def gather_object(obj: Any, group: Group, dst: int = 0) -> list[Any] | None:
    """Every rank's object, in rank order, on `dst`; None elsewhere."""
    import torch.distributed as dist

    if not group.active:
        return [obj]
    out = [None] * group.world_size if group.rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj: Any, group: Group) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    import torch.distributed as dist

    if not group.active:
        return [obj]
    out = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(group: Group) -> None:
    import torch.distributed as dist

    if group.active:
        dist.barrier()


def shared_master(group: Group, model: str | Path, dtype: str | None, shm_dir: str | Path | None = None):
    """One host master for the local ranks of this machine (tide.experts.masters.SharedMaster), or None with one
    local rank. Its directory names this job (torchrun's run id and rendezvous port: two jobs on one machine do not
    meet) and the checkpoint and dtype (a second load in the same job gets its own)."""
    if group.local_world_size < 2:
        return None
    from tide.experts.masters import SharedMaster

    root = Path(shm_dir or os.environ.get("TIDE_SHM_DIR", DEFAULT_SHM_DIR))
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}-{os.environ.get('MASTER_PORT', '0')}"
    what = hashlib.sha256(f"{Path(model).resolve()}|{dtype}|{socket.gethostname()}".encode()).hexdigest()[:12]
    return SharedMaster(root / f"tide-{job}" / what, group.local_rank, group.local_world_size,
                        barrier=lambda: barrier(group))
