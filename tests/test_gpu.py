"""The CUDA paths, run for real (skipped cleanly without a GPU; `make gpu-check` runs them on a GPU machine).

Bit-identity where the same kernels run on the same rows (lossless level a), tier-matched identity for the
host-tier policies (level b), the copy stream overlapping compute, host arenas pinned in place at their exact
size, and at most one device-to-host sync per MoE layer-forward.
"""

import time
import warnings

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.checkpoint import write_random_checkpoint
from tide.config import DecodeConfig, preset
from tide.engine import load
from tide.experts.store import ExpertStore
from tide.policy import Plan, StepInfo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CFG = DecodeConfig(gen_length=48, block_length=16, steps=8, threshold=0.5)
PROMPTS = ["def add(a, b):", "x = [1, 2, 3]\nfor", "Question: what is 12 plus 30?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = preset("tiny", dtype="bfloat16", hidden_size=256, moe_intermediate_size=128, num_experts=32,
                 num_experts_per_tok=4, n_group=4, topk_group=2, intermediate_size=512)
    return write_random_checkpoint(cfg, tmp_path_factory.mktemp("gpu"), seed=3)


def tokens(engine):
    return [engine.generate(engine.encode(p), CFG).tokens for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = load(model_dir, device="cuda", dtype="bfloat16")
    first = tokens(engine)
    assert tokens(engine) == first  # the reference twice: bit-identical
    return first


@pytest.mark.parametrize("policy", ["full-offload", "lru", "accelerate"])
def test_device_only_policies_with_one_slot_are_bit_identical(model_dir, reference, policy):
    engine = load(model_dir, policy=policy, gpu_budget="1/layer", device="cuda", dtype="bfloat16", staging=1)
    assert tokens(engine) == reference


@pytest.mark.parametrize("policy", ["cpu-fallback", "tide"])
def test_host_tier_policies_match_their_tier_matched_replay(model_dir, policy):
    options = {"refresh_interval": 2} if policy == "tide" else {}
    engine = load(model_dir, policy=policy, gpu_budget="4/layer", device="cuda", dtype="bfloat16", cpu_threads=2,
                  **options)
    engine.executor.host_log = []
    run = tokens(engine)
    log, engine.executor.host_log = engine.executor.host_log, None
    assert any(cpu for _, cpu in log)
    engine.configure("tier-matched", "4/layer", host_log=log)
    assert tokens(engine) == run


def test_host_arenas_are_pinned_in_place_at_their_exact_size():
    store = ExpertStore(preset("tiny"), 2, "cuda", torch.bfloat16)
    arena = store.host[1]
    assert arena.is_pinned() and arena.numel() * arena.element_size() == store.num_experts * store.expert_bytes
    arena.normal_()
    store.apply(1, Plan(fetch=frozenset({3})))
    gate_up, _ = store.gpu_weights(1, 3)  # waits on the copy event
    assert torch.equal(gate_up.cpu(), store.host_weights(1, 3)[0])


def test_copy_stream_overlaps_compute():
    store = ExpertStore(preset("tiny"), 1, "cuda", torch.bfloat16)
    src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    a = torch.randn(4096, 4096, device="cuda")

    def copy():
        with torch.cuda.stream(store.copy_stream):
            dst.copy_(src, non_blocking=True)

    def compute():
        for _ in range(20):
            a @ a

    def timed(*work):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for w in work:
            w()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(copy, compute)  # warm up
    alone = timed(copy) + timed(compute)
    together = timed(copy, compute)
    assert together < 0.9 * alone, (together, alone)


def test_at_most_one_sync_per_moe_layer_forward(model_dir):
    engine = load(model_dir, policy="cpu-fallback", gpu_budget="4/layer", device="cuda", dtype="bfloat16")
    layers = len(engine.config.moe_layers)
    ids = torch.tensor([engine.encode(PROMPTS[0])], device="cuda")
    engine.model(ids, 0, None, at=StepInfo(0, 0))  # warm up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.model(ids, 0, None, at=StepInfo(0, 1))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= layers, [str(w.message) for w in syncs]


def test_grouped_gemm_gives_per_expert_bits_on_the_device(model_dir):
    """Lossless level a rests on it: a grouped GEMM over all slots, over a subset, and per expert agree bit for
    bit (otherwise the executor must stay per-expert: set `executor.grouped = False` and say so)."""
    engine = load(model_dir, policy="reference", device="cuda", dtype="bfloat16")
    assert engine.executor.grouped
    grouped = tokens(engine)
    engine.executor.grouped = False
    assert tokens(engine) == grouped
    subset = load(model_dir, policy="lru", gpu_budget="3/layer", device="cuda", dtype="bfloat16")
    assert subset.executor.grouped and tokens(subset) == grouped
