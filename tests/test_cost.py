import pytest

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
    assert cost.source == "measured" and cost.host["cpu"] and cost.expert_bytes == 3 * 64 * 32 * 4
    assert all(s > 0 for _, s in cost.cpu_curve) and cost.h2d_bytes_per_s > 0
