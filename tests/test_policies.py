"""Policy plans as integers: invariants, a hand-made LRU trace, counter identities on the tiny model."""

import pytest

import tide.baselines  # noqa: F401
from tide.config import DecodeConfig
from tide.engine import load
from tide.policy import Plan, PlanError, PolicyContext, StepInfo, check_plan, make_policy

CFG = DecodeConfig(gen_length=32, block_length=16, steps=8, threshold=0.5)


def ctx(slots, num_experts=8, popularity=None):
    return PolicyContext(num_experts, (1,), slots, popularity)


def at(step, layer=1):
    return StepInfo(0, step, layer)


def test_check_plan_catches_broken_plans():
    counts = {1: 3, 2: 1}
    check_plan(Plan(fetch=frozenset({1, 2})), counts, frozenset(), 2)
    bad = [
        (Plan(evict=frozenset({5}), fetch=frozenset({1, 2})), frozenset(), "evicts non-resident"),
        (Plan(fetch=frozenset({1, 2})), frozenset({1}), "already-resident"),
        (Plan(fetch=frozenset({1, 2})), frozenset({3}), "slots"),
        (Plan(fetch=frozenset({1})), frozenset(), "not covered"),
        (Plan(fetch=frozenset({1}), cpu=frozenset({1, 2})), frozenset(), "overlaps"),
        (Plan(fetch=frozenset({1}), cpu=frozenset({2, 7})), frozenset(), "unrouted"),
        (Plan(stream=frozenset({2}), cpu=frozenset({1, 2})), frozenset(), "both streamed"),
    ]
    for plan, resident, message in bad:
        with pytest.raises(PlanError, match=message):
            check_plan(plan, counts, resident, 2, who="policy 'x', layer 1")


def test_lru_hand_made_trace():
    """Capacity 3. Misses are fetched most-tokens-first; victims are the least recently used not in use."""
    lru = make_policy("lru", ctx(3))
    resident = frozenset()
    trace = [
        ({1: 2, 2: 1}, Plan(fetch=frozenset({1, 2}))),  # cold: fetch both, one slot free
        ({3: 1}, Plan(fetch=frozenset({3}))),  # fills the cache; order 1, 2, 3
        ({1: 1, 4: 5}, Plan(fetch=frozenset({4}), evict=frozenset({2}))),  # 2 is the LRU entry not in use
        ({5: 1, 6: 2, 1: 1}, Plan(fetch=frozenset({6, 5}), evict=frozenset({3, 4}))),  # order was 3, 1, 4
        ({7: 1, 8: 1, 9: 1, 5: 1}, Plan(fetch=frozenset({7, 8}), evict=frozenset({1, 6}), stream=frozenset({9}))),
    ]
    for step, (counts, expected) in enumerate(trace):
        plan = lru.plan(at(step), counts, resident, 3)
        check_plan(plan, counts, resident, 3)
        assert plan == expected, f"step {step}"
        resident = (resident - plan.evict) | plan.fetch
    assert resident == {5, 7, 8}


def test_full_offload_fetches_everything_every_time():
    policy = make_policy("full-offload", ctx(2))
    plan = policy.plan(at(0), {4: 1, 1: 3, 6: 2}, frozenset({1, 7}), 2)
    assert plan == Plan(evict=frozenset({1, 7}), fetch=frozenset({1, 4}), stream=frozenset({6}))


def test_cpu_fallback_static_set_from_popularity():
    policy = make_policy("cpu-fallback", ctx(2, popularity={1: {3: 10, 5: 10, 0: 2}}))
    assert policy.warm_start(1) == {3, 5}
    assert policy.plan(at(0), {3: 1, 4: 2}, frozenset({3, 5}), 2) == Plan(cpu=frozenset({4}))
    with pytest.raises(ValueError, match="profiling"):
        make_policy("cpu-fallback", ctx(2))


def test_reference_needs_every_expert():
    with pytest.raises(ValueError, match="all 8 experts"):
        make_policy("reference", ctx(4))


def test_unknown_policy_lists_the_registered_ones():
    with pytest.raises(ValueError, match="lru"):
        make_policy("fifo", ctx(2))


def run(tiny_dir, policy, budget):
    engine = load(tiny_dir, policy=policy, gpu_budget=budget)
    prompt = engine.encode("def add(a, b):")
    engine.generate(prompt, CFG)
    return engine, engine.executor.finish()


def test_full_offload_bytes_equal_unique_routed_experts(tiny_dir):
    engine, counters = run(tiny_dir, "full-offload", "3/layer")
    for r in counters.records:
        assert r.bytes_h2d == r.routed_experts * engine.store.expert_bytes
        assert r.fetched_experts + r.streamed_experts == r.routed_experts


def test_lru_with_every_slot_fetches_each_expert_once(tiny_dir):
    engine, counters = run(tiny_dir, "lru", "all")
    fetched = sum(r.fetched_experts for r in counters.records)
    used = sum(len(per) for per in counters.expert_tokens.values())
    assert fetched == used and sum(r.streamed_experts + r.evicted_experts for r in counters.records) == 0


def test_cpu_fallback_fetches_nothing_after_start_up(tiny_dir):
    engine, counters = run(tiny_dir, "cpu-fallback", "4/layer")
    assert sum(r.bytes_h2d for r in counters.records) == 0
    assert sum(r.pairs_cpu for r in counters.records) > 0
    assert all(len(engine.store.resident(layer)) == 4 for layer in engine.store.layers)
