import statistics

import pytest
import torch

from tide.calibrate import calibrate, estimate
from tide.cost import CostModel, interpolate
from tide.policy import Plan

COST = CostModel(expert_bytes=1000, h2d_bytes_per_s=1e6, h2d_fixed_s=0.0, cpu_curve=((1, 1.0), (10, 10.0)),
                 gpu_curve=((1, 0.1), (10, 0.1)), source="test")


def test_interpolation_is_piecewise_linear_and_extrapolates():
    curve = ((1, 1.0), (3, 2.0), (5, 6.0))
    assert [interpolate(curve, n) for n in (0, 1, 2, 3, 4, 5, 7)] == [1.0, 1.0, 1.5, 2.0, 4.0, 6.0, 10.0]


def test_layer_step_overlap_formula():
    # fetch_s = 1 ms; copies = 2 ms; resident GPU = 0.1 s; fetched GPU = 0.2 s; CPU = 5 s
    plan = Plan(fetch=frozenset({1, 2}), cpu=frozenset({3}))
    counts = {1: 1, 2: 1, 3: 5, 4: 1}
    assert COST.fetch_s() == pytest.approx(1e-3)
    assert COST.layer_step_s(plan, counts) == pytest.approx(max(max(2e-3, 0.1) + 0.2, 5.0))
    no_cpu = Plan(fetch=frozenset({1, 2, 3}))
    assert COST.layer_step_s(no_cpu, counts) == pytest.approx(max(3e-3, 0.1) + 0.3)


def test_json_round_trip(tmp_path):
    path = COST.to_json(tmp_path / "p.json")
    assert CostModel.from_json(path) == COST
    with pytest.raises(FileNotFoundError, match="calibrate"):
        CostModel.from_json(tmp_path / "none.json")


def test_bad_curves_are_rejected():
    with pytest.raises(ValueError, match="cpu_curve"):
        CostModel(1, 1.0, 0.0, ((5, 1.0), (1, 2.0)), ((1, 1.0), (2, 1.0)))


def test_estimate_is_labelled_and_roofline_shaped():
    cost = estimate("a100-pcie4", 2048, 512)
    assert "estimate" in cost.source and cost.expert_bytes == 6_291_456
    assert cost.fetch_s() == pytest.approx(10e-6 + 6_291_456 / 25e9)
    assert cost.cpu_s(1) == pytest.approx(cost.cpu_s(2))  # memory-bound at few tokens
    assert cost.cpu_s(1024) > 5 * cost.cpu_s(1)  # FLOP-bound at many
    with pytest.raises(ValueError, match="reference machine"):
        estimate("tpu", 1, 1)


def test_calibrate_measures_this_machine():
    cost = calibrate(64, 32, __import__("torch").float32, tokens=(1, 8, 64), repeats=3)
    # a 24 KiB expert: the copy rate comes from a bulk copy, a figure a memory system can reach (no 1e-9 floor)
    assert 1e8 < cost.h2d_bytes_per_s < 2e12
    assert cost.source == "measured" and cost.host["cpu"] and cost.expert_bytes == 3 * 64 * 32 * 4
    assert all(s > 0 for _, s in cost.cpu_curve) and cost.h2d_bytes_per_s > 0


def test_modelled_host_time_matches_the_executor():
    """Calibration as executed: for replayed layer-forwards the cost model's host-tier time (makespan of the
    calibrated per-expert times over the workers) is within 25% of what the executor measured on this machine,
    with the default workers and mini-like expert work (a 6 MB fp32 expert, a few tokens each)."""
    import tide.baselines  # noqa: F401
    from tide.calibrate import calibrate
    from tide.config import default_cpu_threads, preset
    from tide.experts.executor import MoEExecutor
    from tide.experts.host_kernels import host_kernel
    from tide.experts.store import ExpertStore
    from tide.policy import PolicyContext, StepInfo, make_policy

    workers, H, I = default_cpu_threads(), 1024, 512
    # 32 experts, the number host_curve() calibrates over: the same working set (on an AMX VM with a 480 MiB
    # last-level cache, tiny's 16 experts, 100 MB, stayed cached and ran at 0.63-0.66 of the 32-expert calibration)
    cfg = preset("tiny", hidden_size=H, moe_intermediate_size=I, num_experts=32)
    # 21 repeats: a calibration is one median per token count, and on a 2-vCPU VM one taken over nine calls was
    # seen 30% off the executor's (a clean clone's first run); the band below is unchanged
    cost = calibrate(H, I, torch.float32, "cpu", cpu_threads=workers, tokens=(1, 2, 4, 8, 16), repeats=21)
    store = ExpertStore(cfg, 1, "cpu", torch.float32)
    for layer in store.layers:
        store.host[layer].normal_(std=0.02)
    ctx = PolicyContext(cfg.num_experts, tuple(cfg.moe_layers), 1, {layer: {0: 1} for layer in cfg.moe_layers})
    kernel, _ = host_kernel("auto", torch.float32, H, I)  # the kernel calibrate() timed
    ex = MoEExecutor(store, make_policy("cpu-fallback", ctx), cpu_threads=workers, host_kernel=kernel)
    ex.warm_start()
    g = torch.Generator().manual_seed(0)
    measured, modelled = [], []
    for i in range(60):
        x = torch.randn(24, H, generator=g)
        ids = torch.stack([torch.randperm(cfg.num_experts, generator=g)[:cfg.num_experts_per_tok] for _ in range(24)])
        ex(1, x, ids, torch.rand(24, cfg.num_experts_per_tok, generator=g), StepInfo(0, i))
        counts = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts).tolist()
        host = [counts[e] for e in range(cfg.num_experts) if counts[e] and e not in store.resident(1)]
        if i >= 4:  # after warm-up
            measured.append(ex.counters.records[-1].cpu_expert_s)
            modelled.append(cost.host_s(host))
    ex.close()
    ratio = statistics.median(m / p for m, p in zip(measured, modelled, strict=True))
    assert 0.75 <= ratio <= 1.25, (ratio, measured[:4], modelled[:4])
