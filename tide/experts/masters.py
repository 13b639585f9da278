"""Where the host master lives: this process's own memory, or pages shared by every rank of one machine.

The host master is, per MoE layer, one arena [E, P] (tide/experts/store.py). `PrivateMaster` allocates it in this
process. `SharedMaster` maps it from files in a shared-memory directory (default /dev/shm): the first local rank
creates the files and fills them while the other local ranks wait, then every local rank maps the same pages (the
others read-only), so a machine holds one copy however many ranks run on it; the files are unlinked as soon as
every local rank has mapped them, so the pages go back to the system when the last rank exits, crashed or not.
Waiting is the caller's `barrier` (torch.distributed at the edge, evals/distributed.py): nothing here knows of
process groups. Owns no weights' contents and decides nothing.
"""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

OWNER = "owner"  # the filling process's pid, so a later run can remove a crashed run's files


class PrivateMaster:
    """The host master in this process's memory (one process, or ranks that do not share a machine)."""

    fills = True  # this process copies the checkpoint into it
    read_only = False

    def arenas(self, layers: list[int], num_experts: int, numel: int, dtype: torch.dtype) -> dict[int, Tensor]:
        return {layer: torch.empty(num_experts, numel, dtype=dtype) for layer in layers}

    def filled(self) -> None:
        """Called once the arenas hold the checkpoint's experts."""


@dataclass
class SharedMaster:
    """The host master in `directory` (on a tmpfs such as /dev/shm), shared by the `local_world_size` ranks of this
    machine; local rank 0 creates and fills it. Every local rank calls `arenas` and then `filled`, in that order,
    with the same arguments; each calls `barrier` twice (after the filling, after the mapping)."""

    directory: Path
    local_rank: int
    local_world_size: int
    barrier: Callable[[], None]

    @property
    def fills(self) -> bool:
        return self.local_rank == 0

    @property
    def read_only(self) -> bool:
        return not self.fills

    def arenas(self, layers: list[int], num_experts: int, numel: int, dtype: torch.dtype) -> dict[int, Tensor]:
        nbytes = num_experts * numel * dtype.itemsize
        if self.fills:
            root = self.directory.parent.parent  # <root>/tide-<job>/<checkpoint>
            sweep_stale(root)
            check_room(root, nbytes * len(layers))
            try:
                self.directory.mkdir(parents=True)
            except FileExistsError:
                raise ValueError(f"{self.directory}: another process is filling a host master there (its pid is in "
                                 f"{OWNER}); remove the directory if that process is gone") from None
            self._guard = RemoveOnExit(self.directory)  # ours from here on
            (self.directory / OWNER).write_text(f"{os.getpid()}\n")
            out = {}
            for layer in layers:
                path = self.directory / f"layer{layer}.bin"
                out[layer] = torch.from_file(str(path), shared=True, size=num_experts * numel,
                                             dtype=dtype).view(num_experts, numel)
            return out
        self.barrier()  # the first local rank has filled every file
        return {layer: map_read_only(self.directory / f"layer{layer}.bin", nbytes, dtype).view(num_experts, numel)
                for layer in layers}

    def filled(self) -> None:
        if self.fills:
            self.barrier()  # the files are complete: the other local ranks map them now
        self.barrier()  # every local rank has mapped them
        if self.fills:
            self._guard.remove()  # the mappings keep the pages; nothing can leak now
            self._guard.done()


def map_read_only(path: Path, nbytes: int, dtype: torch.dtype) -> Tensor:
    """The file's first `nbytes` as a tensor over a read-only shared mapping (a write would fault, not corrupt the
    other ranks' weights); the tensor keeps the mapping alive."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ValueError(f"{path}: the shared host master is missing (did local rank 0 fail while loading?)") from None
    try:
        size = os.fstat(fd).st_size
        if size < nbytes:
            raise ValueError(f"{path}: {size} bytes, the shared host master needs {nbytes}")
        view = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": read-only on purpose
        return torch.frombuffer(view, dtype=dtype)


def check_room(root: Path, nbytes: int) -> None:
    """A tmpfs too small for the master (containers give /dev/shm 64 MB) is a sentence naming the size and the fix."""
    root.mkdir(parents=True, exist_ok=True)
    stat = os.statvfs(root)
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        need_gb = -(-nbytes // 2**30)
        raise ValueError(f"{root} has {free / 1e9:.2f} GB free; the shared host master needs {nbytes / 1e9:.2f} GB: "
                         f"give the container more shared memory (docker run --shm-size={need_gb + 1}g) or name "
                         "a larger tmpfs directory (--shm-dir; shm_dir= in lm-eval's model_args; TIDE_SHM_DIR)")


def sweep_stale(root: Path) -> list[Path]:
    """Remove the directories of host masters whose filling process is gone (a run killed while loading)."""
    removed = []
    for owner in sorted(root.glob(f"tide-*/*/{OWNER}")) if root.is_dir() else []:  # <root>/tide-<job>/<checkpoint>
        try:
            pid = int(owner.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not pid_alive(pid):
            RemoveOnExit.remove_tree(owner.parent)
            removed.append(owner.parent)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RemoveOnExit:
    """While a shared master is being filled: remove its directory if this process leaves first, by an exception,
    Ctrl-C or the SIGTERM a launcher sends when another rank failed (the handler turns it into SystemExit, so this
    runs; the previous handler comes back at `done`)."""

    def __init__(self, directory: Path) -> None:
        self.directory, self.previous = directory, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_term)
        self.active = True
        import atexit

        atexit.register(self._remove)  # an exception or Ctrl-C while filling

    def _on_term(self, signum, frame) -> None:
        self._remove()
        raise SystemExit(128 + signum)

    def _remove(self) -> None:
        if self.active:
            self.remove()

    def remove(self) -> None:
        self.remove_tree(self.directory)

    @staticmethod
    def remove_tree(directory: Path) -> None:
        """A master's directory, and its parent (the job's) if nothing else is left in it."""
        shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.parent.rmdir()
        except OSError:
            pass

    def done(self) -> None:
        self.active = False
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
