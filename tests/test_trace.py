"""Routing traces: file round trips, and the replayer's traffic equals what real execution counted."""

import importlib.util

import pytest

import tide.baselines  # noqa: F401
from tide.calibrate import estimate
from tide.config import DecodeConfig
from tide.engine import load
from tide.policy import PolicyContext, StepInfo, make_policy
from tide.trace import RoutingTrace, replay

CFG = DecodeConfig(gen_length=32, block_length=16, steps=8, threshold=0.5)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_save_load_round_trip(tmp_path, suffix):
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ValueError, match="needs pyarrow"):  # a sentence, not pandas' ImportError
            RoutingTrace(16, [1]).save(tmp_path / "t.parquet")
        pytest.skip("pyarrow is not installed: .parquet traces are refused with a sentence")
    trace = RoutingTrace(16, [1, 2])
    trace.add(StepInfo(0, 3, 1, "denoise"), {4: 2, 9: 1})
    trace.add(StepInfo(1, 0, 2, "commit"), {0: 7})
    back = RoutingTrace.load(trace.save(tmp_path / f"t{suffix}"))
    assert back == trace
    with pytest.raises(ValueError, match="jsonl"):
        trace.save(tmp_path / "t.csv")


@pytest.mark.parametrize("policy, budget, options", [
    ("lru", "3/layer", {}), ("full-offload", "2/layer", {}), ("tide", "5/layer", {"refresh_interval": 3}),
    ("cpu-fallback", "4/layer", {}), ("tide", "4/layer", {"refresh_interval": 2, "prefetch_next": True}),
])
def test_replay_traffic_equals_real_execution(tiny_dir, policy, budget, options):
    engine = load(tiny_dir, policy=policy, gpu_budget=budget, **options)
    warm = {layer: engine.store.resident(layer) for layer in engine.store.layers}
    engine.executor.trace = RoutingTrace(engine.config.num_experts, engine.config.moe_layers)
    engine.executor.counters.clear()
    engine.generate(engine.encode("print('hi')"), CFG)
    real = engine.executor.finish().totals()
    trace = engine.executor.trace
    cost = estimate("h100-pcie5", engine.config.hidden_size, engine.config.moe_intermediate_size)
    cost = cost.for_expert_bytes(engine.store.expert_bytes)
    popularity = None
    if policy == "cpu-fallback":  # rebuild the same static set
        popularity = {layer: {e: 1 for e in warm[layer]} for layer in warm}
    ctx = PolicyContext(engine.config.num_experts, tuple(engine.config.moe_layers), engine.store.slots, popularity)
    fresh = make_policy(policy, ctx, **options)
    out = replay(trace, fresh, engine.store.slots, cost)
    assert out.bytes_h2d == real["bytes_h2d"] and out.prefetched_experts == real["prefetched_experts"]
    assert out.fetched_experts == real["fetched_experts"] and out.streamed_experts == real["streamed_experts"]
    assert (out.pairs_gpu, out.pairs_cpu) == (real["pairs_gpu"], real["pairs_cpu"])
