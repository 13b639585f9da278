"""The executor: combine against a dense reference, thread-count independence, worker errors surface."""

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.config import preset
from tide.experts.executor import MoEExecutor, swiglu
from tide.experts.store import ExpertStore
from tide.policy import PlanError, PolicyContext, StepInfo, make_policy

CFG = preset("tiny")


def setup(policy="cpu-fallback", slots=4, threads=1, popularity=None, dtype=torch.float64, device_kernel="swiglu"):
    store = ExpertStore(CFG, slots, "cpu", dtype)
    g = torch.Generator().manual_seed(0)
    for layer in store.layers:
        store.host[layer].copy_(torch.randn(store.host[layer].shape, generator=g, dtype=torch.float64) * 0.1)
    ctx = PolicyContext(CFG.num_experts, tuple(CFG.moe_layers), slots, popularity or {1: {}, 2: {}})
    ex = MoEExecutor(store, make_policy(policy, ctx), cpu_threads=threads, device_kernel=device_kernel)
    ex.warm_start()
    return store, ex


def routing(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, CFG.hidden_size, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(CFG.num_experts, generator=g)[: CFG.num_experts_per_tok] for _ in range(n)])
    w = torch.rand(n, CFG.num_experts_per_tok, generator=g)
    return x, ids, w


def test_output_equals_dense_per_token_sum():
    store, ex = setup()
    x, ids, w = routing()
    out = ex(1, x, ids, w, StepInfo(0, 0))
    expected = torch.stack([sum(w[t, j].double() * swiglu(x[t:t + 1], *store.host_weights(1, int(ids[t, j])))[0]
                                for j in range(ids.shape[1])) for t in range(x.shape[0])])
    torch.testing.assert_close(out, expected)
    rec = ex.counters.records[-1]
    assert rec.pairs_gpu + rec.pairs_cpu == ids.numel() and rec.pairs_cpu > 0


def test_result_does_not_depend_on_threads_or_tier():
    x, ids, w = routing(seed=2)
    outs = [setup(policy, slots, threads)[1](2, x, ids, w, StepInfo(0, 0))
            for policy, slots, threads in (("cpu-fallback", 1, 1), ("cpu-fallback", 3, 4), ("lru", 16, 1))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cpu_worker_error_reaches_the_caller():
    store, ex = setup()

    def broken(layer, expert):
        raise RuntimeError(f"host expert {expert} exploded")

    store.host_weights = broken
    x, ids, w = routing()
    with pytest.raises(RuntimeError, match="exploded"):
        ex(1, x, ids, w, StepInfo(0, 0))


def test_broken_policy_fails_loudly_with_name_and_layer():
    store, ex = setup()

    class Dropper:
        name = "dropper"

        def plan(self, at, counts, resident, slots):
            from tide.policy import Plan

            return Plan(cpu=frozenset(list(set(counts) - resident)[1:]))  # silently drops one expert

    ex.policy = Dropper()
    x, ids, w = routing()
    with pytest.raises(PlanError, match="policy 'dropper', layer 1: routed experts not covered"):
        ex(1, x, ids, w, StepInfo(0, 0))


def test_one_host_read_per_layer_forward_and_no_syncing_ops(monkeypatch):
    """The counts are the only device-to-host read of a layer-forward (a CPU proxy for the CUDA sync count):
    read_counts runs once per call, the executor counts exactly one wait per call, and no op that syncs on CUDA
    (bincount, nonzero, item, unique) runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    store, ex = setup("cpu-fallback", slots=4, threads=2, popularity={1: {0: 9, 1: 8}, 2: {3: 5}})
    reads = []
    real = ex.read_counts
    monkeypatch.setattr(ex, "read_counts", lambda ids: reads.append(1) or real(ids))
    syncing = {"aten.bincount.default", "aten.nonzero.default", "aten._local_scalar_dense.default",
               "aten._unique2.default", "aten.unique_consecutive.default", "aten.masked_select.default"}
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, ids, w = routing(n=12)
    with Spy():
        ex(1, x, ids, w, StepInfo(0, 0))
        ex(2, x, ids, w, StepInfo(0, 0))
    assert len(reads) == 2 and ex.counters.records[0].pairs_cpu > 0  # the host tier was used
    assert ex.syncs == 2
    assert not syncing & set(seen), syncing & set(seen)


def test_host_log_records_each_calls_host_experts():
    store, ex = setup("cpu-fallback", slots=4, popularity={1: {0: 9, 1: 8}, 2: {3: 5}})
    ex.host_log = []
    x, ids, w = routing(n=6)
    ex(1, x, ids, w, StepInfo(0, 2))
    (at, cpu), = ex.host_log
    assert (at.block, at.step, at.layer) == (0, 2, 1)
    assert cpu == frozenset(ids.unique().tolist()) - store.resident(1)


@pytest.mark.parametrize("policy,slots", [("reference", 16), ("lru", 5)])
def test_grouped_device_tier_equals_per_expert_bits_on_the_cpu(policy, slots):
    """On the CPU torch's grouped GEMM is a loop of mm: the opt-in grouped tier gives swiglu's bits here (on a GPU
    it is promised level c only: tide/experts/executor.py)."""
    x, ids, w = routing(n=12)
    x = x.float()
    outs = []
    for kernel in ("grouped", "swiglu"):  # torch's CPU build has _grouped_mm for float32 and bfloat16
        store, ex = setup(policy, slots=slots, dtype=torch.float32, device_kernel=kernel)
        outs.append([ex(layer, x, ids, w, StepInfo(0, 0)) for layer in (1, 2)])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_every_device_expert_of_every_policy_runs_one_kernel():
    """Levels a and b rest on this by construction: resident, fetched and streamed experts, in every policy and in
    the tier-matched replay, run `swiglu` on their own rows; host experts run the host kernel."""
    x, ids, w = routing(n=12)
    for policy, slots in (("reference", 16), ("lru", 3), ("full-offload", 2), ("cpu-fallback", 4)):
        store, ex = setup(policy, slots=slots, popularity={1: {0: 9, 1: 8}, 2: {3: 5}})
        ex.kernel_log = []
        ex(1, x, ids, w, StepInfo(0, 0))
        ran = {e: k for _, e, k in ex.kernel_log}
        assert sorted(ran) == sorted(set(ids.reshape(-1).tolist())), policy  # each routed expert once
        device = {k for k in ran.values() if not k.startswith("host:")}
        assert device == {"swiglu"}, (policy, device)
        assert ex.counters.records[-1].pairs_cpu == 0 or "host:torch" in ran.values()
    store, ex = setup("cpu-fallback", popularity={1: {0: 9, 1: 8}, 2: {3: 5}})
    ex.host_log = []
    ex(1, x, ids, w, StepInfo(0, 0))
    ex.policy, ex.kernel_log = make_policy("tier-matched", PolicyContext(CFG.num_experts, (1, 2), 4),
                                           host_log=ex.host_log), []
    ex.warm_start()  # the replay's own (empty) resident set
    ex(1, x, ids, w, StepInfo(0, 0))
    assert {k for _, e, k in ex.kernel_log if e not in ex.host_log[0][1]} == {"swiglu"}
    store, ex = setup("lru", slots=2)
    with pytest.raises(ValueError, match="device_kernel 'fast'"):
        MoEExecutor(store, ex.policy, device_kernel="fast")


def count_ops(ex, x, ids, w) -> int:
    from tide.bench.hardware import count_ops as count

    return count(lambda: ex(1, x, ids, w, StepInfo(0, 0)))


def test_ops_per_layer_forward_do_not_grow_with_device_experts():
    """The opt-in grouped device tier is not launch-bound: a layer-forward costs the same ops for 4 or 16 resident
    experts."""
    store, ex = setup("reference", slots=16, dtype=torch.float32, device_kernel="grouped")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, CFG.hidden_size, generator=g)
    w = torch.rand(16, CFG.num_experts_per_tok, generator=g)
    few = torch.arange(4).repeat(16, 1)  # every token routed to experts 0..3
    many = torch.arange(16).view(4, 4).repeat(4, 1)  # every expert: tokens 4i..4i+3 to experts 4(i%4)..
    assert len(many.unique()) == 16
    n_few, n_many = count_ops(ex, x, few, w), count_ops(ex, x, many, w)
    assert n_few == n_many <= 40, (n_few, n_many)
    ex.device_kernel = "swiglu"
    assert count_ops(ex, x, many, w) > n_many + 40  # per-expert calls: ~5 ops for each of 16 experts
