"""The compiled host-tier kernels compute the same expert as torch's swiglu (to bf16 rounding), deterministically
and row by row; they are chosen by name with errors that say why; inside the engine they stay lossless at level b
(the tier-matched reference replays them). Skipped per kernel where this CPU or compiler cannot run it."""

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.config import DecodeConfig
from tide.engine import load
from tide.experts.executor import swiglu
from tide.experts.host_kernels import FEATURE_BIT, compile_library, host_kernel

COMPILED = ("amx-bf16", "avx512-bf16")


def available(name: str) -> bool:
    try:
        return bool(compile_library().tide_cpu_features() & FEATURE_BIT[name])
    except RuntimeError:
        return False


def expert(H: int, I: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(2 * I, H, generator=g) * 0.02).bfloat16()
    down = (torch.randn(H, I, generator=g) * 0.02).bfloat16()
    return gate_up, down


@pytest.mark.parametrize("name", COMPILED)
@pytest.mark.parametrize("H,I", [(64, 32), (2048, 512)])
def test_compiled_kernel_computes_the_expert(name, H, I):
    if not available(name):
        pytest.skip(f"{name} does not run on this machine")
    kernel, _ = host_kernel(name, torch.bfloat16, H, I)
    gate_up, down = expert(H, I)
    for n in (1, 3, 8, 17, 33, 100):
        x = torch.randn(n, H, generator=torch.Generator().manual_seed(n)).bfloat16()
        got, plain = kernel(x, gate_up, down), swiglu(x, gate_up, down)
        gate, up = (x.double() @ gate_up.double().T).chunk(2, dim=-1)
        exact = (torch.nn.functional.silu(gate) * up) @ down.double().T
        scale = exact.abs().max().item()
        assert (got.double() - exact).abs().max().item() < 0.02 * scale  # bf16 rounding of the steps, no more
        assert (got != plain).float().mean().item() < 0.02  # torch's kernel: only last-bit differences, rarely


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_kernel_is_deterministic_row_by_row(name):
    """Same rows, same bits; a row's result does not depend on which other rows share the call."""
    if not available(name):
        pytest.skip(f"{name} does not run on this machine")
    kernel, _ = host_kernel(name, torch.bfloat16, 256, 64)
    gate_up, down = expert(256, 64, seed=1)
    x = torch.randn(21, 256).bfloat16()
    whole = kernel(x, gate_up, down)
    assert torch.equal(whole, kernel(x, gate_up, down))
    for i in range(len(x)):
        assert torch.equal(whole[i:i + 1], kernel(x[i:i + 1], gate_up, down)), i
    assert kernel(x[:0], gate_up, down).shape == (0, 256)


def test_choice_says_why_and_named_kernels_that_cannot_run_are_errors(monkeypatch, tmp_path):
    kernel, note = host_kernel("auto", torch.float32, 64, 32)
    assert kernel is swiglu and "bf16 only" in note
    assert host_kernel("torch", torch.bfloat16, 64, 32)[0] is swiglu
    with pytest.raises(ValueError, match="--host-kernel amx-bf16: the compiled kernels are bf16 only"):
        host_kernel("amx-bf16", torch.float32, 64, 32)
    with pytest.raises(ValueError, match=r"moe_intermediate_size \(40\) must be multiples of 32"):
        host_kernel("avx512-bf16", torch.bfloat16, 64, 40)
    with pytest.raises(ValueError, match="choose one of auto, torch"):
        host_kernel("fast", torch.bfloat16, 64, 32)
    monkeypatch.setenv("CC", "no-such-compiler")
    kernel, note = host_kernel("auto", torch.bfloat16, 64, 32, cache=tmp_path)
    assert kernel is swiglu and "no C compiler" in note and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="--host-kernel avx512-bf16: no C compiler"):
        host_kernel("avx512-bf16", torch.bfloat16, 64, 32, cache=tmp_path)


@pytest.mark.parametrize("name", COMPILED)
def test_engine_with_compiled_host_kernel_is_lossless_at_level_b(tiny_dir, name):
    """cpu-fallback in bf16 with the compiled kernel: bit-identical to its tier-matched reference."""
    if not available(name):
        pytest.skip(f"{name} does not run on this machine")
    cfg = DecodeConfig(gen_length=32, block_length=16, steps=8, threshold=0.5)
    engine = load(tiny_dir, policy="cpu-fallback", gpu_budget="4/layer", dtype="bfloat16", host_kernel=name,
                  cpu_threads=2)
    assert engine.host_kernel.name == name and any(name in n for n in engine.notes)
    prompts = [engine.encode(p) for p in ("def add(a, b):", "x = [1, 2, 3]\nfor")]
    engine.executor.host_log = []
    run = [engine.generate(p, cfg).tokens for p in prompts]
    log, engine.executor.host_log = engine.executor.host_log, None
    assert any(cpu for _, cpu in log)
    engine.configure("tier-matched", "4/layer", host_log=log)
    assert [engine.generate(p, cfg).tokens for p in prompts] == run
