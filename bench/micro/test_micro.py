"""pytest-benchmark micro-benchmarks of the hot paths (`make microbench`; never part of `make test`).

One MoE layer-forward per policy on the tiny shape (with its dispatched ops), one expert fetch, one CPU expert at
n = 1, 4, 32 tokens, and the host tier at mini expert shape in bf16 per host kernel (its share of the read
bandwidth). Timings are of this machine; the device tier is CUDA when available, else the CPU (then a fetch is a
memcpy). Run with -s (as `make microbench` does) to see the printed ops and bandwidth shares.
"""

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.bench.hardware import count_ops
from tide.bench.host_tier import SHAPES, read_bandwidth
from tide.config import preset
from tide.experts.executor import MoEExecutor, swiglu
from tide.experts.host_kernels import host_kernel
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

    ops = count_ops(run)
    benchmark.extra_info["ops_per_layer_forward"] = ops
    print(f"\n{policy}: {ops} dispatched ops per MoE layer-forward (32 tokens, top-{CFG.num_experts_per_tok})")
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


@pytest.fixture(scope="module")
def bandwidth():
    return read_bandwidth(1)[0]


@pytest.mark.parametrize("kernel_name", ["torch", "amx-bf16", "avx512", "avx512-bf16", "avx2"])
@pytest.mark.parametrize("tokens", [1, 8])
def test_host_tier_share_of_read_bandwidth(benchmark, bandwidth, kernel_name, tokens):
    """32 distinct mini-shaped bf16 experts on one thread, `tokens` rows each, the next 32 of 320 (2 GB, more than
    the last-level cache) every round: weight bytes/s over the read bandwidth."""
    H, I = SHAPES["mini"]
    try:
        kernel, _ = host_kernel(kernel_name, torch.bfloat16, H, I)
    except ValueError as why:
        pytest.skip(str(why))
    experts = torch.empty(320, 3 * I * H, dtype=torch.bfloat16).normal_(std=0.02)
    views = [(e[: 2 * I * H].view(2 * I, H), e[2 * I * H:].view(H, I)) for e in experts]
    x = torch.randn(tokens, H).bfloat16()
    rounds = iter(range(10**9))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a host-tier worker runs
    try:
        benchmark.pedantic(lambda: [kernel(x, *v) for v in views[next(rounds) % 10 * 32:][:32]], rounds=9,
                           warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    share = 32 * 3 * I * H * 2 / benchmark.stats.stats.median / bandwidth
    benchmark.extra_info["share_of_read_bw"] = share
    print(f"\nhost tier {kernel_name}, mini bf16, {tokens} token(s): {share:.2f} of the read bandwidth "
          f"({bandwidth / 1e9:.1f} GB/s, one thread)")
