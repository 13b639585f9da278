"""The CUDA path on a machine without CUDA: CUDA's presence faked (device strings, set_device, memory queries, host
registration return codes), and `load`, `configure`, the CLI's `--device cuda`, `calibrate` and TideLM driven as far
as they go before the first real CUDA allocation. These catch, without a GPU, the kind of defect that would stop
the first GPU run: an unindexed device reaching torch, memory refused only after something was allocated, a
failed page-lock left latched.
"""

from __future__ import annotations

import types

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.device import resolve_device
from tide.experts.store import DeviceMemoryError


class Reached(Exception):
    """Raised by a stand-in at the first step that would allocate on the (absent) GPU."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices, the current one index 1, 80 GB free; set_device refuses an unindexed device as torch does."""
    state = types.SimpleNamespace(set_device=[], free_bytes=80 * 10**9, total_bytes=80 * 10**9)

    def set_device(device):
        device = torch.device(device) if isinstance(device, str) else device
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        state.set_device.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state.free_bytes, state.total_bytes))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return state


def test_devices_are_indexed_at_the_edge(fake_cuda):
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the current device, not a guess at 0
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    for bad, why in (("cuda:2", "has 2 CUDA device"), ("mps", "runs on cpu or cuda"), ("gpu0", "is not a device")):
        with pytest.raises(ValueError, match=why):
            resolve_device(bad)


def test_without_cuda_a_cuda_device_is_a_sentence():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def commands_with_a_device_option():
    from tide.bench.soak import main as soak
    from tide.cli import main

    out = []
    for name, command in [*main.commands.items(), ("soak", soak)]:
        out += [(name, command, p) for p in command.params if p.name == "device"]
    return out


def test_every_command_hands_the_engine_an_indexed_device(fake_cuda):
    """Every `--device` option, in every command, turns `cuda` into `cuda:<current>` before anything runs."""
    import click

    found = commands_with_a_device_option()
    assert {name for name, _, _ in found} >= {"generate", "bench", "eval", "reproduce", "calibrate", "plan",
                                                "stability", "soak"}
    for name, command, param in found:
        ctx = click.Context(command)
        assert param.process_value(ctx, "cuda") == "cuda:1", name
        with pytest.raises(click.BadParameter):
            param.process_value(ctx, "cuda:7")


def test_load_sets_an_indexed_device_and_reaches_the_weights(fake_cuda, tiny_dir, monkeypatch):
    import tide.engine as engine

    seen = []

    def load_model(reader, device, dtype):
        seen.append(device)
        raise Reached

    monkeypatch.setattr(engine, "load_model", load_model)
    with pytest.raises(Reached):
        engine.load(tiny_dir, device="cuda", dtype="bfloat16")
    assert fake_cuda.set_device == [torch.device("cuda", 1)] and seen == [torch.device("cuda", 1)]


def test_the_cli_reaches_the_engine_with_an_indexed_device(fake_cuda, tiny_dir, monkeypatch):
    from click.testing import CliRunner

    import tide.engine as engine
    from tide.cli import main

    seen = []
    def load_model(reader, device, dtype):
        seen.append(device)
        raise Reached

    monkeypatch.setattr(engine, "load_model", load_model)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_dir), "--prompt-ids", "1,2,3", "--device",
                                       "cuda"])
    assert isinstance(result.exception, Reached) and seen == [torch.device("cuda", 1)], result.output


def test_memory_is_refused_before_anything_is_allocated(fake_cuda, tiny_dir, monkeypatch):
    """Device and host memory are checked against every need (non-expert weights, expert tier, host master) before
    the first allocation: a refusal leaves nothing loaded."""
    import psutil

    import tide.engine as engine

    def load_model(*args):
        raise AssertionError("weights were loaded before the memory was checked")

    monkeypatch.setattr(engine, "load_model", load_model)
    fake_cuda.free_bytes = 1000
    with pytest.raises(DeviceMemoryError, match=r"of cuda:1 is needed \(the non-expert weights .* GB, the expert "
                                                r"tier \(16/layer and 2 staging\) .* nothing was loaded"):
        engine.load(tiny_dir, device="cuda")
    fake_cuda.free_bytes = 80 * 10**9
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1000))
    with pytest.raises(DeviceMemoryError, match="of host memory is needed .the host master of the routed experts"):
        engine.load(tiny_dir, device="cuda")


def test_configure_refuses_a_tier_that_does_not_fit_before_allocating(fake_cuda, tiny_dir):
    from tide.engine import load

    engine = load(tiny_dir, policy="lru", gpu_budget="2/layer")  # on the CPU; then its store poses as a GPU's
    # room = free + the current tier (given back first): 3 + 2 per layer and the ring, less the ring: 5/layer
    engine.store.device = torch.device("cuda", 1)
    fake_cuda.free_bytes = 3 * engine.store.expert_bytes * len(engine.store.layers)
    engine.store.resize = lambda *a, **k: pytest.fail("the tier was allocated before it was checked")
    with pytest.raises(DeviceMemoryError, match="at most 5/layer fits"):
        engine.configure("lru", "8/layer")


def test_calibrate_sets_an_indexed_device(fake_cuda, monkeypatch):
    from tide import calibrate

    def set_device(device):
        fake_cuda.set_device.append(device)
        raise Reached

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(Reached):
        calibrate.calibrate(64, 32, torch.bfloat16, "cuda")
    assert fake_cuda.set_device == [torch.device("cuda", 1)]


def test_lm_eval_model_reaches_the_engine_with_an_indexed_device(fake_cuda, tiny_dir, monkeypatch):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install .[eval])")
    import tide.engine as engine
    from tide.evals.lm_eval_model import TideLM

    seen = []

    def load(path, **kw):
        seen.append(kw["device"])
        raise Reached

    monkeypatch.setattr(engine, "load", load)
    with pytest.raises(Reached):
        TideLM(pretrained=str(tiny_dir), device="cuda")
    assert seen == ["cuda:1"]


class FakeCudart:
    def __init__(self, register_error: int, log: list) -> None:
        self.register_error, self.log = register_error, log

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.log.append(("register", nbytes))
        return self.register_error

    def cudaHostUnregister(self, ptr):
        self.log.append(("unregister", ptr))
        return 0

    def cudaGetErrorString(self, err):
        return {2: "out of memory", 801: "operation not supported"}[int(err)]


@pytest.mark.parametrize("code,hint", [(2, "memlock"), (801, "cannot page-lock")])
def test_a_failed_page_lock_is_reported_and_cleared_at_the_registration(monkeypatch, code, hint):
    """cudaHostRegister's return code is checked where it happens; the latched CUDA error is cleared there (else the
    next kernel launch reports it as its own) and the message gives CUDA's own words."""
    from tide.experts import store as store_module

    log, cleared = [], []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(code, log))
    monkeypatch.setattr(store_module, "clear_cuda_error", lambda: cleared.append(1) or code)
    arena = torch.empty(1000, dtype=torch.bfloat16)
    with pytest.raises(DeviceMemoryError, match=rf"master of layer 3: cudaHostRegister returned {code} .* {hint}"):
        store_module.Pinned(arena, object(), "the expert master of layer 3")
    assert cleared == [1] and log == [("register", 2000)]


def test_the_host_master_is_unpinned_on_close_after_its_copies(monkeypatch):
    from tide.config import preset
    from tide.experts import store as store_module

    log = []
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(0, log))
    store = store_module.ExpertStore(preset("tiny"), 2, "cpu", torch.float32)
    store._pins = [store_module.Pinned(a, store, f"layer {layer}") for layer, a in store.host.items()]
    store.copy_stream = types.SimpleNamespace(synchronize=lambda: log.append(("sync",)))
    store.close()
    assert [e[0] for e in log] == ["register"] * 2 + ["sync"] + ["unregister"] * 2
    store.close()  # twice is harmless: nothing is unregistered again
    del store
    assert [e[0] for e in log].count("unregister") == 2


def test_clear_cuda_error_without_libcudart_returns_none():
    if any("libcudart.so" in line for line in open("/proc/self/maps")):
        pytest.skip("libcudart is loaded here")
    from tide.experts.store import clear_cuda_error

    assert clear_cuda_error() is None
