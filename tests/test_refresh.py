"""The TIDE policy as integers: refresh semantics, R=1, the static limit, the cost-based choice."""

import pytest

from tide.calibrate import estimate
from tide.policy import Plan, PolicyContext, StepInfo, check_plan
from tide.refresh import TideRefresh

CTX = PolicyContext(8, (1,), 3)


def drive(policy, trace, slots=3, block0=0):
    """Run a policy over [(block, step, counts)] and return its plans, checking each."""
    resident, plans = policy.warm_start(1), []
    for block, step, counts in trace:
        plan = policy.plan(StepInfo(block, step, 1), counts, resident, slots)
        check_plan(plan, counts, resident, slots)
        resident = (resident - plan.evict) | plan.fetch
        plans.append(plan)
    return plans


TRACE = [(0, 0, {1: 5, 2: 3, 3: 1, 4: 1}), (0, 1, {1: 4, 5: 6, 2: 1}), (0, 2, {6: 3, 1: 2}),
         (1, 0, {6: 1, 7: 9, 1: 2}), (1, 1, {7: 3, 2: 2, 3: 1}), (1, 2, {7: 4, 3: 3, 4: 1}),
         (1, 3, {2: 2, 3: 2, 8 % 8: 5})]


def refresh_every_step(trace, slots=3):
    """Independent statement of 'refresh every step': resident := top-C of this step, least-hit demoted."""
    resident, plans = frozenset(), []
    for _, _, counts in trace:
        top = sorted(counts, key=lambda e: (-counts[e], e))[:slots]
        promote = frozenset(top) - resident
        extra = len(promote) - (slots - len(resident))
        demote = sorted(resident - set(top), key=lambda e: (counts.get(e, 0), e))[: max(0, extra)]
        plans.append(Plan(fetch=promote, evict=frozenset(demote), cpu=frozenset(counts) - set(top)))
        resident = (resident - set(demote)) | promote
    return plans


def test_r1_is_refresh_every_step():
    assert drive(TideRefresh(CTX, refresh_interval=1, first_block_every_step=False), TRACE) == refresh_every_step(
        TRACE)


def test_refresh_points_and_cpu_misses():
    plans = drive(TideRefresh(CTX, refresh_interval=2), TRACE)
    # block 0 is the first generated block: every step refreshes (top-3 of the step, least-hit demoted)
    assert plans[0] == Plan(fetch=frozenset({1, 2, 3}), cpu=frozenset({4}))
    assert plans[1] == Plan(fetch=frozenset({5}), evict=frozenset({3}))
    assert plans[2] == Plan(fetch=frozenset({6}), evict=frozenset({2}))
    # block 1, R=2: refresh at steps 0 and 2; steps 1 and 3 send every miss to the CPU and fetch nothing
    assert plans[3] == Plan(fetch=frozenset({7}), evict=frozenset({5}))
    assert plans[4] == Plan(cpu=frozenset({2, 3}))
    assert plans[5] == Plan(fetch=frozenset({3, 4}), evict=frozenset({1, 6}))
    assert plans[6] == Plan(cpu=frozenset({0, 2}))


def test_large_r_with_warm_start_is_static_between_block_starts():
    warm = PolicyContext(8, (1,), 3, popularity={1: {1: 9, 2: 8, 7: 7}})
    tide = TideRefresh(warm, refresh_interval=99, first_block_every_step=False)
    assert tide.warm_start(1) == {1, 2, 7}
    plans = drive(tide, TRACE)
    resident = tide.warm_start(1)
    for (_, step, counts), plan in zip(TRACE, plans, strict=True):
        if step > 0:  # no refresh inside a block: exactly what a static resident set plans
            assert plan == Plan(cpu=frozenset(counts) - resident)
        resident = (resident - plan.evict) | plan.fetch


def test_rank_interval_uses_tokens_since_last_refresh():
    tide = TideRefresh(PolicyContext(8, (1,), 1), refresh_interval=2, rank="interval", first_block_every_step=False)
    trace = [(0, 0, {1: 1}), (0, 1, {2: 5}), (0, 2, {1: 2, 3: 3})]
    plans = drive(tide, trace, slots=1)
    # since the refresh at step 0: expert 2 has 5 tokens, 3 has 3, 1 has 2 -> 2 wins though absent at step 2
    assert plans[2].fetch == {2}


def test_cost_fetch_takes_heavy_misses_to_the_gpu():
    cost = estimate("h100-pcie5", 2048, 512)
    assert cost.fetch_s() + cost.gpu_s(512) < cost.cpu_s(512)  # many tokens: copy beats CPU
    assert cost.fetch_s() + cost.gpu_s(1) > cost.cpu_s(1)  # one token: CPU beats the copy
    tide = TideRefresh(CTX, refresh_interval=4, first_block_every_step=False, cost=cost, cost_fetch=True)
    plans = drive(tide, [(0, 0, {1: 1}), (0, 1, {2: 512, 3: 1, 1: 1})])
    assert plans[1].fetch == {2} and plans[1].cpu == {3}


def test_bad_options():
    with pytest.raises(ValueError, match="refresh_interval"):
        TideRefresh(CTX, refresh_interval=0)
    with pytest.raises(ValueError, match="rank"):
        TideRefresh(CTX, rank="popular")
    with pytest.raises(ValueError, match="cost model"):
        TideRefresh(CTX, cost_fetch=True)


def drive_two_layers(prefetch: bool) -> tuple[list[frozenset], int]:
    """Routing drifts by one expert per step; returns layer 2's fetches at its refreshes and prefetched count."""
    tide = TideRefresh(PolicyContext(8, (1, 2), 2), refresh_interval=2, first_block_every_step=False,
                       prefetch_next=prefetch)
    resident = {1: frozenset(), 2: frozenset()}
    at_refresh, prefetched = [], 0
    for step in range(6):
        counts = {step: 5, step + 1: 4, 7: 1}
        for layer in (1, 2):
            plan = tide.plan(StepInfo(1, step, layer), counts, resident[layer], 2)
            check_plan(plan, counts, resident[layer], 2)
            resident[layer] = (resident[layer] - plan.evict) | plan.fetch
            if layer == 2 and step % 2 == 0:
                at_refresh.append(plan.fetch)
            if layer == 1:
                pre = tide.prefetch(StepInfo(1, step, 2), resident[2], 2)
                if pre is not None:
                    check_plan(pre, {}, resident[2], 2)
                    resident[2] = (resident[2] - pre.evict) | pre.fetch
                    prefetched += len(pre.fetch)
    return at_refresh, prefetched


def test_prefetch_moves_refresh_copies_off_the_critical_path():
    plain, none = drive_two_layers(False)
    early, prefetched = drive_two_layers(True)
    assert none == 0 and plain == [frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5})]
    # from step 2 on, the previous step's top ({1,2}, {3,4}) is already loaded: one copy left per refresh
    assert early == [frozenset({0, 1}), frozenset({3}), frozenset({5})]
    assert prefetched == 2  # expert 2 before the step-2 refresh, expert 4 before the step-4 one
    tide = TideRefresh(PolicyContext(8, (1, 2), 2), refresh_interval=2, prefetch_next=True)
    assert tide.prefetch(StepInfo(1, 3, 2), frozenset(), 2) is None  # no history, and step 3 is no refresh
