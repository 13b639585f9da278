"""pytest-benchmark micro-benchmarks of the hot paths (`make microbench`; never part of `make test`).

One MoE layer-forward per policy on the tiny shape, one expert fetch, one CPU expert at n = 1, 4, 32 tokens.
Timings are of this machine; the device tier is CUDA when available, else the CPU (then a fetch is a memcpy).
"""

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.config import preset
from tide.experts.executor import MoEExecutor, swiglu
from tide.experts.store import ExpertStore
from tide.policy import Plan, PolicyContext, StepInfo, make_policy

CFG = preset("tiny", hidden_size=256, moe_intermediate_size=128, num_experts=32, n_group=4, topk_group=2)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def store():
    s = ExpertStore(CFG, 8, DEVICE, torch.float32)
    for layer in s.layers:
        s.host[layer].normal_(std=0.02)
    return s


@pytest.mark.parametrize("policy", ["reference", "full-offload", "lru", "cpu-fallback", "tide"])
def test_moe_layer_forward(benchmark, policy):
    slots = CFG.num_experts if policy == "reference" else 8
    s = ExpertStore(CFG, slots, DEVICE, torch.float32)
    for layer in s.layers:
        s.host[layer].normal_(std=0.02)
    ctx = PolicyContext(CFG.num_experts, tuple(CFG.moe_layers), slots, {1: {e: e for e in range(32)}, 2: {}})
    ex = MoEExecutor(s, make_policy(policy, ctx, **({"refresh_interval": 4} if policy == "tide" else {})))
    ex.warm_start()
    x = torch.randn(32, CFG.hidden_size, device=DEVICE)
    ids = torch.stack([torch.randperm(CFG.num_experts)[: CFG.num_experts_per_tok] for _ in range(32)]).to(DEVICE)
    w = torch.rand(32, CFG.num_experts_per_tok, device=DEVICE)
    step = iter(range(10**9))

    def run():
        ex(1, x, ids, w, StepInfo(1, next(step) % 32))
        sync()

    benchmark(run)


def test_fetch_one_expert(benchmark, store):
    def run():
        store.apply(1, Plan(evict=store.resident(1), fetch=frozenset({3})))
        store.gpu_weights(1, 3)
        sync()

    benchmark(run)


@pytest.mark.parametrize("tokens", [1, 4, 32])
def test_cpu_expert(benchmark, store, tokens):
    gate_up, down = store.host_weights(1, 0)
    x = torch.randn(tokens, CFG.hidden_size)
    benchmark(lambda: swiglu(x, gate_up, down))
