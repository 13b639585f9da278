"""Host-tier expert kernels, chosen by name: torch's `swiglu`, or a compiled SwiGLU from host_kernel.c.

- `amx-bf16` (AMX tiles) and `avx512-bf16` (vdpbf16ps): bf16, on CPUs with AVX-512 BF16 (and AMX);
- `avx512`: bf16 and fp32, on CPUs with AVX-512F/BW/VL (bf16 weights widened to fp32 in registers, 16-lane FMA);
- `avx2`: bf16 and fp32, on any x86-64 CPU with AVX2 and FMA (the same on 8 lanes).
Each reads the expert's weights once, straight from the host master, where torch's bf16 GEMM reorders the
unpacked weights on every call. hidden and intermediate sizes must be multiples of 32. `auto` takes the first that
runs here for the dtype, in the order of speed amx-bf16, avx512, avx512-bf16, avx2, then torch, and says why.

host_kernel.c is one source compiled in four builds (BUILDS) with the system C compiler ($CC, else cc) into a
cache directory, keyed by the source's and flags' hash: `avx512` (every kernel), `avx512f` (avx512 and avx2's
GEMMs), `avx2`, and `scalar`, which runs the FMA kernels' code on 8-float structs with the same operations in the
same order: the same bits on any machine, so the tests check the avx2 and avx512 kernels' logic where the CPU lacks
their instructions (kernels `scalar` and `scalar16`, not offered to users: they are slow).

Lossless either way: the same rounding points as torch's `swiglu` (bf16: each GEMM sums in fp32 and rounds to
bf16, silu and the product too), only the dot products' summation order and silu's exp may differ by an fp32 ulp,
and the tier-matched reference computes its host experts with the same kernel. Each output row depends on its own
input row only (no batch-size effects).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache as memoize
from pathlib import Path

import torch
from torch import Tensor

from tide.config import HOST_KERNELS
from tide.experts.executor import swiglu

SOURCE = Path(__file__).with_name("host_kernel.c")
# -ffp-contract=off: no fused a * b + c that the source did not ask for (the scalar twin must match the avx2 build)
COMMON_FLAGS = ("-O3", "-std=gnu11", "-fPIC", "-shared", "-ffp-contract=off")
BUILDS = {
    "scalar": (),
    "avx2": ("-mavx2", "-mfma"),
    "avx512f": ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"),
    "avx512": ("-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile",
               "-mamx-bf16"),
}
# tide_cpu_features() bits (host_kernel.c): what this CPU and its OS offer.
FEATURE_BITS = {"avx512-bf16": 1, "amx-bf16": 2, "avx2": 4, "avx512f": 8}


@dataclass(frozen=True)
class Compiled:
    build: str                       # which build of host_kernel.c holds it
    needs: str | None                # the CPU feature (FEATURE_BITS) it runs on; None: any x86-64
    dtypes: tuple[torch.dtype, ...]  # host master dtypes it computes
    gemm: int                        # tide_swiglu_bf16's `gemm` argument


KERNELS = {
    "amx-bf16": Compiled("avx512", "amx-bf16", (torch.bfloat16,), 2),
    "avx512": Compiled("avx512f", "avx512f", (torch.bfloat16, torch.float32), 3),
    "avx512-bf16": Compiled("avx512", "avx512-bf16", (torch.bfloat16,), 1),
    "avx2": Compiled("avx2", "avx2", (torch.bfloat16, torch.float32), 0),
    "scalar": Compiled("scalar", None, (torch.bfloat16, torch.float32), 0),  # tests only: avx2's twin
    "scalar16": Compiled("scalar", None, (torch.bfloat16, torch.float32), 3),  # tests only: avx512's twin
}
# fastest first, as measured (README, "Host kernels"): avx512 before avx512-bf16 because vdpbf16ps ran at a quarter
# of the 16-lane FMA's rate (half its MACs) on the one AVX512-BF16 host without AMX measured
AUTO_ORDER = ("amx-bf16", "avx512", "avx512-bf16", "avx2")


class CompiledSwiglu:
    """A compiled kernel as a host kernel: (x [n, H], gate_up [2I, H], down [H, I]) -> y [n, H], bf16 or fp32; and
    `many`, a layer-forward's host experts as one job the executor's workers share."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.name, self.gemm = name, KERNELS[name].gemm
        # ctypes releases the GIL for the call: the executor's workers run in parallel
        self.bf16, self.f32 = library.tide_swiglu_bf16_many, library.tide_swiglu_f32_many
        pointers = [ctypes.c_int64] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
        self.bf16.argtypes = pointers + [ctypes.c_int, ctypes.c_void_p]
        self.f32.argtypes = pointers + [ctypes.c_int, ctypes.c_void_p]
        self.bf16.restype = self.f32.restype = ctypes.c_int

    def __call__(self, x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        y = torch.empty_like(x)
        self.many([(x, gate_up, down, y)])()
        return y

    def many(self, work: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> Callable[[], None]:
        """A job that writes y = the expert (gate_up, down) on x for every (x, gate_up, down, y) in `work` (one
        dtype and expert shape): any number of threads may run it at once, each computing the next expert not yet
        taken until none is left (a shared counter in C hands them out)."""
        count = len(work)
        if not count:
            return lambda: None
        H, I = work[0][0].shape[1], work[0][2].shape[1]
        for x, gate_up, down, y in work:
            self._check(x, gate_up, down, y, work[0][0].dtype, H, I)
        pointers = [(ctypes.c_void_p * count)(*(t.data_ptr() for t in column)) for column in zip(*work, strict=True)]
        rows = (ctypes.c_int64 * count)(*(x.shape[0] for x, *_ in work))
        if work[0][0].dtype == torch.bfloat16:
            call, args = self.bf16, (count, *pointers, rows, H, I, self.gemm)
        else:
            call, args = self.f32, (count, *pointers, rows, H, I, self.gemm)
        return SharedJob(self.name, call, args, work)


    def _check(self, x: Tensor, gate_up: Tensor, down: Tensor, y: Tensor, dtype: torch.dtype, H: int, I: int) -> None:
        dtypes, tensors = KERNELS[self.name].dtypes, {"x": x, "gate_up": gate_up, "down": down, "y": y}
        if (any(t.dtype != dtype for t in tensors.values()) or dtype not in dtypes
                or any(t.device.type != "cpu" or not t.is_contiguous() for t in tensors.values())):
            got = ", ".join(f"{k} {t.dtype} on {t.device}" + ("" if t.is_contiguous() else " (not contiguous)")
                            for k, t in tensors.items())
            raise ValueError(f"host kernel {self.name}: needs contiguous CPU tensors of one dtype of "
                             f"{', '.join(str(d) for d in dtypes)}; got {got}")
        n = x.shape[0]
        if (x.shape != (n, H) or gate_up.shape != (2 * I, H) or down.shape != (H, I) or y.shape != (n, H)
                or H % 32 or I % 32):
            raise ValueError(f"host kernel {self.name}: shapes x {tuple(x.shape)}, gate_up {tuple(gate_up.shape)}, "
                             f"down {tuple(down.shape)}, y {tuple(y.shape)} are not [n, H], [2I, H], [H, I], [n, H] "
                             f"with H, I multiples of 32 and one expert shape per call")


class SharedJob:
    """CompiledSwiglu.many's job: holds its tensors (the kernel reads them through raw pointers) and the counter
    that hands out its experts."""

    def __init__(self, name: str, call: Callable[..., int], args: tuple, work: list) -> None:
        self.name, self.call, self.args, self.work = name, call, args, work
        self.taken = ctypes.c_int64(0)

    def __call__(self) -> None:
        code = self.call(*self.args, ctypes.byref(self.taken))
        if code:
            raise MemoryError(f"host kernel {self.name}: no memory for its scratch buffers") if code == 1 else \
                RuntimeError(f"host kernel {self.name}: not in this build of {SOURCE.name}")


def default_cache() -> Path:
    from tide.hub import cache_dir

    return cache_dir() / "host-kernels"


def compile_library(build: str, cache: Path | None = None) -> ctypes.CDLL:
    """One build (BUILDS) of host_kernel.c, compiled once per source version into `cache` (default
    .cache/host-kernels of the checkout, else ~/.cache/tide/host-kernels); RuntimeError says why not."""
    cache = default_cache() if cache is None else cache
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set CC)")
    flags = [*COMMON_FLAGS, *BUILDS[build]]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache / f"host_kernel-{build}-{digest}.so"
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if done.returncode:
            tmp.unlink(missing_ok=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{compiler} could not build {SOURCE.name} for {build}: {last}")
        os.replace(tmp, target)  # atomic: a concurrent build or reader never sees half a library
    library = ctypes.CDLL(str(target))
    library.tide_cpu_features.restype = ctypes.c_int
    library.tide_build.restype = ctypes.c_char_p
    if library.tide_build().decode() != build:
        raise RuntimeError(f"{compiler} built {SOURCE.name} without the {build} instructions "
                           f"(it reports {library.tide_build().decode()!r})")
    return library


@memoize
def _features(cache: Path | None) -> int:
    return compile_library("scalar", cache).tide_cpu_features()  # the scalar build runs on any x86-64


def cpu_features(cache: Path | None = None) -> set[str]:
    """The FEATURE_BITS names this CPU and its OS offer (also grants this process the AMX tile state)."""
    bits = _features(cache)
    return {name for name, bit in FEATURE_BITS.items() if bits & bit}


def compiled_kernel(name: str, cache: Path | None = None) -> CompiledSwiglu:
    """The compiled kernel `name` (KERNELS); RuntimeError says why it cannot run here."""
    needs = KERNELS[name].needs
    if needs is not None and needs not in cpu_features(cache):
        raise RuntimeError(f"this CPU (or its OS) does not offer {needs}")
    return CompiledSwiglu(compile_library(KERNELS[name].build, cache), name)


def host_kernel(name: str, dtype: torch.dtype, hidden_size: int, moe_intermediate_size: int,
                cache: Path | None = None) -> tuple[Callable[[Tensor, Tensor, Tensor], Tensor], str]:
    """(kernel, one line saying which and why) for `--host-kernel name`; a named kernel that cannot run here is a
    ValueError that says why, `auto` takes the first of AUTO_ORDER that runs and says why it passed the others,
    else torch. `cache`: see compile_library."""
    if name not in HOST_KERNELS:
        raise ValueError(f"--host-kernel {name!r}: choose one of {', '.join(HOST_KERNELS)}")
    if name == "torch":
        return swiglu, "torch (swiglu, as asked)"
    passed = []
    for candidate in AUTO_ORDER if name == "auto" else (name,):
        try:
            if dtype not in KERNELS[candidate].dtypes:
                computes = " and ".join(str(d).removeprefix("torch.") for d in KERNELS[candidate].dtypes)
                master = str(dtype).removeprefix("torch.")
                raise RuntimeError(f"it computes {computes} only, the host master is {master}")
            if hidden_size % 32 or moe_intermediate_size % 32:
                raise RuntimeError(f"hidden_size ({hidden_size}) and moe_intermediate_size "
                                   f"({moe_intermediate_size}) must be multiples of 32")
            kernel = compiled_kernel(candidate, cache)
        except RuntimeError as why:
            if name != "auto":
                raise ValueError(f"--host-kernel {name}: {why}") from None
            passed.append(f"{candidate}: {why}")
            continue
        skipped = f"; not {'; '.join(passed)}" if passed else ""
        return kernel, f"{candidate} (compiled, {SOURCE.name}{skipped})"
    return swiglu, f"torch (swiglu; no compiled kernel runs here: {'; '.join(passed)})"


def kernel_name(kernel: Callable) -> str:
    return getattr(kernel, "name", "torch")
