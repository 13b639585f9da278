"""The compiled host-tier kernels compute the same expert as torch's swiglu (to bf16 rounding, or fp32 summation
order), deterministically and row by row; they are chosen by name, and by `auto` in the order of speed, with errors
and notes that say why; inside the engine they stay lossless at level b (the tier-matched reference replays them).
A kernel whose instructions this CPU lacks is skipped, but its C code is still tested here: the scalar build runs
the AVX2 kernel's code lane by lane and must give the same bits (checked against the AVX2 build where it runs)."""

import ctypes
import re
import threading
from pathlib import Path

import pytest
import torch

import tide.baselines  # noqa: F401
import tide.experts.host_kernels as hk
from tide.config import HOST_KERNELS, DecodeConfig
from tide.engine import load
from tide.experts.executor import swiglu

SHAPES = {"tiny": (64, 32), "mini": (2048, 512), "flash": (4096, 1024)}
TOKENS = (1, 3, 8, 17, 32)


def runs_here(name: str, features: bool = False) -> bool:
    """Kernel `name` runs here; features=True: `name` is a CPU feature (FEATURE_BITS) this CPU offers."""
    if features:
        return name in hk.cpu_features()
    try:
        hk.compiled_kernel(name)
        return True
    except RuntimeError:
        return False


def kernel(name: str):
    if not runs_here(name):
        pytest.skip(f"{name} does not run on this machine (CPU features: {sorted(hk.cpu_features())})")
    return hk.compiled_kernel(name)


def expert(H: int, I: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(2 * I, H, generator=g) * 0.02).to(dtype)
    down = (torch.randn(H, I, generator=g) * 0.02).to(dtype)
    return gate_up, down


def exact(x, gate_up, down):
    gate, up = (x.double() @ gate_up.double().T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.double().T


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,dtype", [(k, d) for k, spec in hk.KERNELS.items() for d in spec.dtypes])
def test_compiled_kernel_computes_the_expert(name, dtype, shape):
    H, I = SHAPES[shape]
    run = kernel(name)
    gate_up, down = expert(H, I, dtype)
    slow = name.startswith("scalar") and shape == "flash"  # the twins: slow, and tested bit for bit below
    for n in (1, 3) if slow else TOKENS:
        x = torch.randn(n, H, generator=torch.Generator().manual_seed(n)).to(dtype)
        got, plain, truth = run(x, gate_up, down), swiglu(x, gate_up, down), exact(x, gate_up, down)
        scale = truth.abs().max().item()
        if dtype == torch.bfloat16:
            assert (got.double() - truth).abs().max().item() < 0.02 * scale, n  # bf16 rounding of the steps
            assert (got != plain).float().mean().item() < 0.02, n  # torch's kernel: rare last-bit differences
        else:  # fp32: summation order and exp's last ulp only
            assert (got.double() - truth).abs().max().item() < 1e-5 * scale, n
            torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name,twin", [("avx2", "scalar"), ("avx512", "scalar16")])
def test_scalar_build_is_the_fma_kernel_bit_for_bit(dtype, name, twin):
    """The scalar twins run the FMA kernels' code on 8-float structs: same operations, same order, same bits
    (what lets a machine without AVX2 or AVX-512 test that code). Also the same GEMM in every other build that
    runs here (avx512's 16 lanes on pairs of ymm in the avx2 build, avx2's in the avx512 builds)."""
    scalar = hk.compiled_kernel(twin)
    builds = [b for b in hk.BUILDS if b != "scalar" and runs_here({"avx512": "avx512-bf16"}.get(b, b), features=True)]
    if not builds:
        pytest.skip(f"no vector build runs on this machine (CPU features: {sorted(hk.cpu_features())})")
    for build in builds:
        run = hk.CompiledSwiglu(hk.compile_library(build), twin)  # the twin's gemm, in this build
        for H, I in (SHAPES["tiny"], SHAPES["mini"]):
            gate_up, down = expert(H, I, dtype, seed=3)
            for n in TOKENS:
                x = torch.randn(n, H, generator=torch.Generator().manual_seed(n)).to(dtype)
                assert torch.equal(run(x, gate_up, down), scalar(x, gate_up, down)), (build, H, n)
    if runs_here(name):
        x = torch.randn(17, 64).to(dtype)
        gate_up, down = expert(64, 32, dtype)
        assert torch.equal(kernel(name)(x, gate_up, down), scalar(x, gate_up, down))


def test_exp_and_silu_match_torch_over_the_whole_range():
    """The kernels' vectorised exp and silu (every build): within a few fp32 ulps of torch's, from -100 to 100."""
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 88.5, -88.5])
    x = torch.cat([torch.linspace(-100, 100, 80_000), edges])
    x = torch.cat([x, torch.zeros(-len(x) % 8)])
    for build in [b for b in hk.BUILDS if b == "scalar" or b in hk.cpu_features() or
                  (b == "avx512" and "avx512-bf16" in hk.cpu_features())]:
        library = hk.compile_library(build)
        e, s = torch.empty_like(x), torch.empty_like(x)
        library.tide_exp_silu.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64]
        library.tide_exp_silu(x.data_ptr(), e.data_ptr(), s.data_ptr(), len(x))
        inside = (x >= -87) & (x <= 88)
        torch.testing.assert_close(e[inside], torch.exp(x[inside]), rtol=4e-7, atol=0, msg=build)
        torch.testing.assert_close(s, torch.nn.functional.silu(x), rtol=4e-7, atol=1e-35, msg=build)


@pytest.mark.parametrize("name", ["amx-bf16", "avx512", "avx512-bf16", "avx2", "scalar", "scalar16"])
def test_compiled_kernel_is_deterministic_row_by_row(name):
    """Same rows, same bits; a row's result does not depend on which other rows share the call."""
    run = kernel(name)
    for dtype in hk.KERNELS[name].dtypes:
        gate_up, down = expert(256, 64, dtype, seed=1)
        x = torch.randn(40, 256).to(dtype)
        whole = run(x, gate_up, down)
        assert torch.equal(whole, run(x, gate_up, down))
        for i in range(len(x)):
            assert torch.equal(whole[i:i + 1], run(x[i:i + 1], gate_up, down)), (dtype, i)
        assert torch.equal(whole[5:38], run(x[5:38], gate_up, down))  # 33 rows: AMX's pairs of groups
        assert run(x[:0], gate_up, down).shape == (0, 256)


def test_wrong_inputs_are_errors_that_say_what():
    run = hk.compiled_kernel("scalar")
    gate_up, down = expert(64, 32, torch.bfloat16)
    x = torch.randn(2, 64).bfloat16()
    with pytest.raises(ValueError, match="one dtype of torch.bfloat16, torch.float32; got x torch.float32 on cpu"):
        run(x.float(), gate_up, down)
    with pytest.raises(ValueError, match=r"x torch.bfloat16 on cpu \(not contiguous\)"):
        run(torch.randn(64, 2).bfloat16().T, gate_up, down)
    with pytest.raises(ValueError, match=r"shapes x \(2, 64\), gate_up \(32, 64\)"):
        run(x, gate_up[:32], down)
    with pytest.raises(ValueError, match="float16"):
        hk.compiled_kernel("scalar")(x.half(), gate_up.half(), down.half())


def test_cpu_features_agree_with_the_kernels_view_of_proc_cpuinfo():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    features = hk.cpu_features()
    assert ("avx2" in features) == ({"avx2", "fma"} <= flags)
    assert ("avx512f" in features) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)
    assert ("avx512-bf16" in features) == ({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags)
    if "amx-bf16" in features:
        assert {"amx_tile", "amx_bf16"} <= flags


@pytest.mark.parametrize("offered,dtype,picked", [
    ({"amx-bf16", "avx512-bf16", "avx512f", "avx2"}, torch.bfloat16, "amx-bf16"),
    ({"avx512-bf16", "avx512f", "avx2"}, torch.bfloat16, "avx512"),
    ({"avx512-bf16", "avx2"}, torch.bfloat16, "avx512-bf16"),  # not a real CPU: the order past avx512
    ({"avx512f", "avx2"}, torch.bfloat16, "avx512"),  # AVX-512 without BF16 (Skylake to Ice Lake)
    ({"avx2"}, torch.bfloat16, "avx2"),  # AMD EPYC Rome/Milan
    ({"amx-bf16", "avx512-bf16", "avx512f", "avx2"}, torch.float32, "avx512"),
    ({"avx2"}, torch.float32, "avx2"),
    (set(), torch.bfloat16, "torch"),
])
def test_auto_takes_the_fastest_kernel_this_cpu_offers_and_says_why(monkeypatch, tmp_path, offered, dtype, picked):
    monkeypatch.setattr(hk, "cpu_features", lambda cache=None: offered)
    run, note = hk.host_kernel("auto", dtype, 64, 32)
    assert hk.kernel_name(run) == picked and note.startswith(picked)
    for faster in hk.AUTO_ORDER[:hk.AUTO_ORDER.index(picked)] if picked != "torch" else hk.AUTO_ORDER:
        assert f"{faster}: " in note  # each faster kernel passed over, with its reason
    if picked == "torch":
        assert "does not offer avx2" in note


def test_named_kernels_that_cannot_run_are_errors_that_say_why(monkeypatch, tmp_path):
    assert "scalar" not in HOST_KERNELS and "scalar16" not in HOST_KERNELS  # test kernels, not for users
    kernel, note = hk.host_kernel("auto", torch.float16, 64, 32)
    assert kernel is swiglu and "the host master is float16" in note
    assert hk.host_kernel("torch", torch.bfloat16, 64, 32)[0] is swiglu
    with pytest.raises(ValueError, match="--host-kernel amx-bf16: it computes bfloat16 only, the host master is fl"):
        hk.host_kernel("amx-bf16", torch.float32, 64, 32)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(40\) must be multiples of 32"):
        hk.host_kernel("avx2", torch.bfloat16, 64, 40)
    with pytest.raises(ValueError, match="choose one of auto, torch"):
        hk.host_kernel("fast", torch.bfloat16, 64, 32)
    monkeypatch.setattr(hk, "cpu_features", lambda cache=None: {"avx2"})
    with pytest.raises(ValueError, match="--host-kernel avx512-bf16: this CPU .or its OS. does not offer avx512-bf16"):
        hk.host_kernel("avx512-bf16", torch.bfloat16, 64, 32)
    monkeypatch.undo()
    monkeypatch.setenv("CC", "no-such-compiler")
    kernel, note = hk.host_kernel("auto", torch.bfloat16, 64, 32, cache=tmp_path)
    assert kernel is swiglu and "no C compiler" in note and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="--host-kernel avx2: no C compiler"):
        hk.host_kernel("avx2", torch.bfloat16, 64, 32, cache=tmp_path)


@pytest.mark.parametrize("name,dtype", [("amx-bf16", "bfloat16"), ("avx512", "bfloat16"), ("avx512", "float32"),
                                        ("avx512-bf16", "bfloat16"), ("avx2", "bfloat16"), ("avx2", "float32")])
def test_engine_with_compiled_host_kernel_is_lossless_at_level_b(tiny_dir, name, dtype):
    """cpu-fallback with the compiled kernel: bit-identical to its tier-matched reference."""
    kernel(name)
    cfg = DecodeConfig(gen_length=32, block_length=16, steps=8, threshold=0.5)
    engine = load(tiny_dir, policy="cpu-fallback", gpu_budget="4/layer", dtype=dtype, host_kernel=name, cpu_threads=2)
    assert engine.host_kernel.name == name and any(name in n for n in engine.notes)
    prompts = [engine.encode(p) for p in ("def add(a, b):", "x = [1, 2, 3]\nfor")]
    engine.executor.host_log = []
    run = [engine.generate(p, cfg).tokens for p in prompts]
    log, engine.executor.host_log = engine.executor.host_log, None
    assert any(cpu for _, cpu in log)
    engine.configure("tier-matched", "4/layer", host_log=log)
    assert [engine.generate(p, cfg).tokens for p in prompts] == run


def test_a_shared_job_computes_each_expert_once_whatever_the_threads():
    """`many`: threads running one job take the experts from a shared counter; every y is written, once, with the
    bits of a call on its own."""
    run = hk.compiled_kernel("scalar")
    experts = [expert(64, 32, torch.bfloat16, seed=s) for s in range(3)]
    xs = [torch.randn(n, 64).bfloat16() for n in (1, 3, 8, 2, 17) * 6]
    ys = [torch.full_like(x, float("nan")) for x in xs]
    job = run.many([(x, *experts[i % 3], y) for i, (x, y) in enumerate(zip(xs, ys, strict=True))])
    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job()  # nothing left: a no-op
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        assert torch.equal(y, run(x, *experts[i % 3])), i


def test_executor_shares_a_compiled_job_with_the_same_bits_as_expert_by_expert(tiny_cfg):
    """The executor's shared job (kernels with `many`) and its per-expert tasks (other kernels) give the same bits."""
    from tide.experts.executor import MoEExecutor
    from tide.experts.store import ExpertStore
    from tide.policy import PolicyContext, StepInfo, make_policy

    compiled = hk.compiled_kernel("scalar")
    outputs = []
    for kernel in (compiled, lambda x, gate_up, down: compiled(x, gate_up, down)):  # the lambda has no `many`
        store = ExpertStore(tiny_cfg, 2, "cpu", torch.bfloat16)
        for layer in store.layers:
            seeded = torch.Generator().manual_seed(layer)
            store.host[layer].copy_(torch.randn(store.host[layer].shape, generator=seeded) * 0.1)
        ctx = PolicyContext(tiny_cfg.num_experts, tuple(tiny_cfg.moe_layers), 2, {})
        ex = MoEExecutor(store, make_policy("cpu-fallback", ctx), cpu_threads=2, host_kernel=kernel)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, tiny_cfg.hidden_size, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(tiny_cfg.num_experts, generator=g)[:4] for _ in range(24)])
        layer = store.layers[0]
        outputs.append(ex(layer, x, ids, torch.rand(24, 4, generator=g), StepInfo(0, 0)))
        assert ex.counters.records[-1].pairs_cpu > 0
        ex.close()
    assert torch.equal(*outputs)


def test_the_read_bandwidth_loop_builds_and_reads_everything_on_every_host():
    """The host-tier study's yardstick (tide_read_bytes) in every build this CPU runs, the scalar one everywhere,
    with 1, 2 and 4 streams: it reads every byte (the OR of all words, a set bit at the start, the middle and the
    end of the last stream), so it cannot be optimised into reading less."""
    buf = torch.zeros(1 << 16, dtype=torch.int64)
    buf[0], buf[12345], buf[-1] = 1 << 2, 1 << 40, 3
    offered = hk.cpu_features()
    runnable = ["scalar"] + [b for b, needs in (("avx2", "avx2"), ("avx512f", "avx512f"), ("avx512", "avx512-bf16"))
                             if needs in offered]
    for build in runnable:
        library = hk.compile_library(build)
        library.tide_read_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        library.tide_read_bytes.restype = ctypes.c_uint64
        for streams in (1, 2, 4):
            assert library.tide_read_bytes(buf.data_ptr(), buf.numel() * 8, streams) == (1 << 40) | 7, (build, streams)
        assert library.tide_read_bytes(buf.data_ptr(), buf.numel() * 8, 3) == 0  # a stream count it does not take


def test_the_fma_peak_loop_runs_in_every_build_and_names_its_lanes():
    """The study's compute yardstick (tide_fma_peak): 16 fp32 lanes in the AVX-512F builds, 8 in avx2 and scalar;
    and the kernels' FMA ceilings come from the build they run in (none for the AMX and vdpbf16ps kernels)."""
    from tide.bench.host_tier import fma_build

    offered = hk.cpu_features()
    for build, needs, lanes in (("scalar", None, 8), ("avx2", "avx2", 8), ("avx512f", "avx512f", 16),
                                ("avx512", "avx512-bf16", 16)):
        if needs is None or needs in offered:
            library = hk.compile_library(build)
            library.tide_fma_peak.argtypes = [ctypes.c_int64]
            assert library.tide_fma_peak(1000) == lanes, build
    assert fma_build("avx2", offered) == "avx2" and fma_build("avx512", offered) == "avx512f"
    assert fma_build("amx-bf16", offered) is None and fma_build("avx512-bf16", offered) is None
    assert fma_build("torch", {"avx2", "avx512f"}) == "avx512f" and fma_build("torch", {"avx2"}) == "avx2"
