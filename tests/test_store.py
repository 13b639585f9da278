"""The expert store on the CPU tier: packing, slots, eviction without copy-back, the staging ring."""

import pytest
import torch

from tide.config import preset
from tide.experts.store import ExpertStore
from tide.policy import Plan

CFG = preset("tiny")


def filled_store(slots=3, staging=2):
    store = ExpertStore(CFG, slots, "cpu", torch.float32, staging)
    for layer in store.layers:
        store.host[layer].copy_(torch.randn_like(store.host[layer]))
    return store


def test_put_packs_gate_up_down():
    store = ExpertStore(CFG, 2, "cpu", torch.float32)
    I, H = CFG.moe_intermediate_size, CFG.hidden_size
    gate, up, down = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    store.put(1, 5, gate, up, down)
    gate_up, d = store.host_weights(1, 5)
    assert torch.equal(gate_up, torch.cat([gate, up])) and torch.equal(d, down)
    assert store.expert_bytes == 3 * I * H * 4
    with pytest.raises(ValueError, match="expert 5 down_proj: shape"):
        store.put(1, 5, gate, up, down.T)


def test_fetch_evict_and_slot_reuse():
    store = filled_store(slots=2)
    store.apply(1, Plan(fetch=frozenset({4, 9})))
    assert store.resident(1) == {4, 9} and store.resident(2) == frozenset()
    for e in (4, 9):
        assert torch.equal(store.gpu_weights(1, e)[0], store.host_weights(1, e)[0])
    host_before = store.host[1].clone()
    store.apply(1, Plan(evict=frozenset({4}), fetch=frozenset({7})))
    assert store.resident(1) == {7, 9}
    assert torch.equal(store.gpu_weights(1, 7)[1], store.host_weights(1, 7)[1])
    assert torch.equal(store.host[1], host_before)  # eviction never writes back


def test_staging_ring_cycles_buffers():
    store = filled_store(staging=2)
    seen = []
    for e in (1, 2, 3):
        (gate_up, down), index = store.stream_in(2, e)
        assert torch.equal(down, store.host_weights(2, e)[1])
        store.stream_done(index)
        seen.append(index)
    assert seen == [0, 1, 0]


def test_slot_limits_and_device_bytes():
    with pytest.raises(ValueError, match="slots"):
        ExpertStore(CFG, 0, "cpu", torch.float32)
    with pytest.raises(ValueError, match="exceed num_experts"):
        ExpertStore(CFG, CFG.num_experts + 1, "cpu", torch.float32)
    store = ExpertStore(CFG, 3, "cpu", torch.float32, staging=2)
    assert store.device_bytes == (3 * len(CFG.moe_layers) + 2) * store.expert_bytes
    assert ExpertStore(CFG, 3, "cpu", torch.float32, device_tier=False).device_bytes == 0


def test_resize_is_transactional_under_allocation_failure(monkeypatch):
    """A device tier that does not fit leaves a consistent store and a sentence; a later resize works."""
    import tide.experts.store as st

    store = filled_store(slots=3)
    store.apply(1, Plan(fetch=frozenset({2})))
    real_empty = torch.empty

    def failing_empty(*shape, **kw):
        if shape and shape[0] == 9:  # the 9-slot tier "does not fit"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_empty(*shape, **kw)

    monkeypatch.setattr(st.torch, "empty", failing_empty)
    with pytest.raises(st.DeviceMemoryError, match="9 expert slots per layer need"):
        store.resize(9)
    assert store.slots == 0 and store.device_bytes == 0 and store.resident(1) == frozenset()
    monkeypatch.setattr(st.torch, "empty", real_empty)
    store.resize(4)
    store.apply(1, Plan(fetch=frozenset({5})))
    assert torch.equal(store.gpu_weights(1, 5)[0], store.host_weights(1, 5)[0])


def test_host_memory_is_checked_before_allocating(monkeypatch):
    import tide.experts.store as st

    monkeypatch.setattr(st, "free_bytes", lambda device: 1000)
    with pytest.raises(st.DeviceMemoryError, match="host master of the routed experts needs .* GB of host memory"):
        ExpertStore(CFG, 2, "cpu", torch.float32)
