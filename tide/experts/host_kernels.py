"""Host-tier expert kernels, chosen by name: torch's `swiglu`, or the compiled bf16 SwiGLU in host_kernel.c.

`amx-bf16` (AMX tiles) and `avx512-bf16` (vdpbf16ps) read each expert's weights once, straight from the host
master, where torch's bf16 GEMM reorders the unpacked weights on every call; they are for bf16 on CPUs that
have the instructions, with hidden and intermediate sizes multiples of 32. `auto` takes the first that applies
in the order amx-bf16, avx512-bf16, torch and says why. The library is compiled on first use with the system C
compiler ($CC, else cc) into a cache directory, keyed by the source's hash.

Lossless either way: same rounding points as torch's bf16 `swiglu` (each GEMM sums in fp32 and rounds to bf16),
only the dot products' summation order may differ, and the tier-matched reference computes its host experts
with the same kernel. Each output row depends on its own input row only (no batch-size effects).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from tide.config import HOST_KERNELS
from tide.experts.executor import swiglu

SOURCE = Path(__file__).with_name("host_kernel.c")
FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-shared", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mamx-tile", "-mamx-bf16"]
FEATURE_BIT = {"avx512-bf16": 1, "amx-bf16": 2}


class CompiledSwiglu:
    """The compiled kernel as a host kernel: (x [n, H], gate_up [2I, H], down [H, I]) -> y [n, H], bf16."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.name, self.amx = name, int(name == "amx-bf16")
        self.fn = library.tide_swiglu_bf16  # ctypes releases the GIL for the call: workers run in parallel
        self.fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        self.fn.restype = ctypes.c_int

    def __call__(self, x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        for t in (x, gate_up, down):
            if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"host kernel {self.name}: needs contiguous bf16 CPU tensors, got {t.dtype} on "
                                 f"{t.device} (contiguous: {t.is_contiguous()})")
        y = torch.empty_like(x)
        if self.fn(x.data_ptr(), gate_up.data_ptr(), down.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1],
                   down.shape[1], self.amx):
            raise MemoryError(f"host kernel {self.name}: no memory for its scratch buffers")
        return y


def compile_library(cache: Path | None = None) -> ctypes.CDLL:
    """The compiled host_kernel.c (built once per source version into `cache`, default .cache/host-kernels of
    the checkout, else ~/.cache/tide/host-kernels); RuntimeError says why not."""
    if cache is None:
        from tide.hub import cache_dir

        cache = cache_dir() / "host-kernels"
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set CC)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache / f"host_kernel-{digest}.so"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True,
                              text=True)
        if done.returncode:
            tmp.unlink(missing_ok=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {last}")
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a library
    library = ctypes.CDLL(str(target))
    library.tide_cpu_features.restype = ctypes.c_int
    return library


def host_kernel(name: str, dtype: torch.dtype, hidden_size: int, moe_intermediate_size: int,
                cache: Path | None = None) -> tuple[Callable[[Tensor, Tensor, Tensor], Tensor], str]:
    """(kernel, one line saying which and why) for `--host-kernel name`; a named kernel that cannot run here is a
    ValueError that says why, `auto` falls back to torch and says why. `cache`: see compile_library."""
    if name not in HOST_KERNELS:
        raise ValueError(f"--host-kernel {name!r}: choose one of {', '.join(HOST_KERNELS)}")
    if name == "torch":
        return swiglu, "torch (swiglu, as asked)"
    wanted = ["amx-bf16", "avx512-bf16"] if name == "auto" else [name]
    try:
        if dtype != torch.bfloat16:
            raise RuntimeError(f"the compiled kernels are bf16 only, the host master is {dtype}")
        if hidden_size % 32 or moe_intermediate_size % 32:
            raise RuntimeError(f"hidden_size ({hidden_size}) and moe_intermediate_size ({moe_intermediate_size}) "
                               "must be multiples of 32")
        library = compile_library(cache)
        features = library.tide_cpu_features()
        usable = [k for k in wanted if features & FEATURE_BIT[k]]
        if not usable:
            raise RuntimeError(f"this CPU (or its OS) does not offer {' or '.join(wanted)}")
    except RuntimeError as why:
        if name != "auto":
            raise ValueError(f"--host-kernel {name}: {why}") from None
        return swiglu, f"torch (swiglu; compiled kernels not used: {why})"
    return CompiledSwiglu(library, usable[0]), f"{usable[0]} (compiled, {SOURCE.name})"


def kernel_name(kernel: Callable) -> str:
    return getattr(kernel, "name", "torch")
