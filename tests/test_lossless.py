"""Losslessness is a test: every policy, at several budgets, in both regimes, gives the reference's tokens."""

import pytest

import tide.baselines  # noqa: F401
from tide.config import DecodeConfig
from tide.engine import load

PROMPTS = ["def add(a, b):", "x = [1, 2, 3]\nfor"]
BUDGETS = ["1/layer", "5/layer", "75%"]
POLICIES = ["full-offload", "lru", "cpu-fallback", "accelerate", "tide"]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    engine = load(tiny_dir)
    out = {}
    for regime in ("full", "block-kv"):
        cfg = DecodeConfig(gen_length=40, block_length=16, steps=8, threshold=0.5, regime=regime)
        out[regime] = [engine.generate(engine.encode(p), cfg).tokens for p in PROMPTS]
    assert out["full"] == out["block-kv"]
    return out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_policy_is_token_identical_to_reference(tiny_dir, reference, policy, budget):
    options = {"refresh_interval": 3} if policy == "tide" else {}
    engine = load(tiny_dir, policy=policy, gpu_budget=budget, cpu_threads=2, **options)
    for regime in ("full", "block-kv"):
        cfg = DecodeConfig(gen_length=40, block_length=16, steps=8, threshold=0.5, regime=regime)
        got = [engine.generate(engine.encode(p), cfg).tokens for p in PROMPTS]
        assert got == reference[regime], f"{policy} at {budget} ({regime}) differs from the reference"


@pytest.mark.parametrize("options", [{"refresh_interval": 1}, {"refresh_interval": 8, "rank": "interval"},
                                     {"refresh_interval": 2, "first_block_every_step": False, "cost_fetch": True},
                                     {"refresh_interval": "auto", "per_layer_interval": True},
                                     {"refresh_interval": 3, "prefetch_next": True}])
def test_tide_variants_are_token_identical(tiny_dir, reference, options):
    from tide.calibrate import estimate

    cost = estimate("h100-pcie5", 64, 32, 4)
    if options.get("cost_fetch") or options.get("refresh_interval") == "auto":
        options = {**options, "cost": cost}
    engine = load(tiny_dir, policy="tide", gpu_budget="4/layer", **options)
    cfg = DecodeConfig(gen_length=40, block_length=16, steps=8, threshold=0.5, regime="block-kv")
    assert [engine.generate(engine.encode(p), cfg).tokens for p in PROMPTS] == reference["block-kv"]
