"""The executor: combine against a dense reference, thread-count independence, worker errors surface."""

import pytest
import torch

import tide.baselines  # noqa: F401
from tide.config import preset
from tide.experts.executor import MoEExecutor, swiglu
from tide.experts.store import ExpertStore
from tide.policy import PlanError, PolicyContext, StepInfo, make_policy

CFG = preset("tiny")


def setup(policy="cpu-fallback", slots=4, threads=1, popularity=None):
    store = ExpertStore(CFG, slots, "cpu", torch.float64)
    g = torch.Generator().manual_seed(0)
    for layer in store.layers:
        store.host[layer].copy_(torch.randn(store.host[layer].shape, generator=g, dtype=torch.float64) * 0.1)
    ctx = PolicyContext(CFG.num_experts, tuple(CFG.moe_layers), slots, popularity or {1: {}, 2: {}})
    ex = MoEExecutor(store, make_policy(policy, ctx), cpu_threads=threads)
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
