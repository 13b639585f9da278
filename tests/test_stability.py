"""bench/stability.py: every metric on a hand-made trace equals its hand-computed value; a smoke run of the command."""

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
from click.testing import CliRunner

import tide.bench.stability as st
from tide.bench.stability import ALL, COLUMNS, block_steps, cosine, lagged, study
from tide.planner import drift_stats, sub_trace
from tide.trace import RoutingTrace, TraceRecord

# Layer 1, block 0: three denoising steps. Layer 2, block 0: two. Prefill and commit records must be ignored.
L1 = [{0: 3, 1: 1}, {0: 2, 1: 2}, {1: 3, 2: 1}]
L2 = [{3: 4}, {3: 2, 0: 2}]


def hand_trace() -> RoutingTrace:
    records = [TraceRecord(0, 0, "prefill", 1, {2: 9}), TraceRecord(0, 0, "prefill", 2, {2: 9})]
    records += [TraceRecord(0, s, "denoise", 1, c) for s, c in enumerate(L1)]
    records += [TraceRecord(0, s, "denoise", 2, c) for s, c in enumerate(L2)]
    records += [TraceRecord(0, 3, "commit", 1, {3: 9}), TraceRecord(0, 2, "commit", 2, {3: 9})]
    return RoutingTrace(4, [1, 2], records[::-1])  # reversed: step order must come from the records, not the file


def value(rows: list[dict], metric: str, layer=ALL, k="", c="") -> tuple[float, int]:
    (row,) = [r for r in rows if r["metric"] == metric and r["layer"] == layer and r["k_or_R"] == k and r["C"] == c]
    return row["value"], row["n"]


def test_block_steps_keeps_denoising_steps_in_order():
    assert block_steps(hand_trace()) == {1: [L1], 2: [L2]}


def test_cosine_and_overlap_by_hand():
    assert cosine(L1[0], L1[1]) == pytest.approx(8 / math.sqrt(80))  # (3*2 + 1*2) / (|(3,1)| |(2,2)|)
    assert cosine(L1[0], L1[2]) == pytest.approx(0.3)  # 1*3 / (sqrt(10) sqrt(10))
    assert math.isnan(cosine({}, L1[0]))
    assert st.overlap(L1[0], L1[1], 1) == 1.0  # {0} and {0}: the 2-2 tie goes to the lower id
    assert st.overlap(L1[1], L1[2], 2) == 0.5  # {0, 1} and {1, 2}
    lags = lagged(hand_trace(), 3, "cosine")
    assert lags[1][1] == pytest.approx([8 / math.sqrt(80), 6 / math.sqrt(80)])
    assert lags[1][2] == pytest.approx([0.3]) and lags[1][3] == [] and lags[2][1] == pytest.approx([2 ** -0.5])


def test_hit_ratio_over_r_by_hand():
    assert st.window_hits(L1[:2], 1) == (5, 8)  # top-1 of step 0 is {0}: 3 + 2 of 4 + 4 routed pairs
    hits = st.hits_by_window(hand_trace(), 4, 1)[1]
    assert hits[1] == [(3, 4), (2, 4), (3, 4)] and hits[2] == [(5, 8), (2, 8)] and hits[3] == [(5, 12)]
    assert hits[4] == []  # no block has 4 steps


def test_study_rows_equal_hand_values():
    rows = study(hand_trace(), "block-kv", sizes=[1, 2], max_lag=2, max_window=4)
    assert all(set(r) == set(COLUMNS) for r in rows)
    assert value(rows, "cosine", 1, 1) == (pytest.approx((8 + 6) / math.sqrt(80) / 2), 2)
    all_k1 = [8 / math.sqrt(80), 6 / math.sqrt(80), 2 ** -0.5]  # ALL: every (s, s+1) pair of every layer
    assert value(rows, "cosine", ALL, 1) == (pytest.approx(sum(all_k1) / 3), 3)
    assert value(rows, "overlap", 1, 1, 1) == (0.5, 2) and value(rows, "overlap", 1, 2, 1) == (0.0, 1)
    assert value(rows, "overlap", 1, 1, 2) == (0.75, 2) and value(rows, "overlap", 1, 2, 2) == (0.5, 1)
    assert value(rows, "hit_ratio", 1, 1, 1) == (pytest.approx(8 / 12), 3)
    assert value(rows, "hit_ratio", 1, 2, 1) == (pytest.approx(7 / 16), 2)
    assert value(rows, "hit_ratio", 1, 3, 1) == (pytest.approx(5 / 12), 1)
    hit, n = value(rows, "hit_ratio", 1, 4, 1)
    assert math.isnan(hit) and n == 0
    # ALL pools pairs over layers: layer 2's top-1 of step 0 is {3}: 4 of 4, then 2 of 4
    assert value(rows, "hit_ratio", ALL, 1, 1) == (pytest.approx((8 + 6) / 20), 5)
    assert value(rows, "unique_experts", 1) == (2.0, 3)
    assert value(rows, "unique_experts", ALL) == (pytest.approx(9 / 5), 5)
    assert value(rows, "routed_pairs", ALL) == (4.0, 5)
    # d: top-1 sets {0},{0},{1} turn over 0 then 1; top-2 sets {0,1},{0,1},{1,2} turn over 0 then 1/2
    assert value(rows, "drift_d", 1, "", 1) == (0.5, 2) and value(rows, "drift_d", 1, "", 2) == (0.25, 2)
    trace = hand_trace()
    for c in (1, 2):
        assert value(rows, "drift_d", ALL, "", c)[0] == drift_stats(trace, c, 4)[0]
        assert value(rows, "drift_d", 2, "", c)[0] == drift_stats(sub_trace(trace, [2]), c, 4)[0]
    assert value(rows, "miss_by_age", 1, 0, 1)[0] == pytest.approx(1 - 8 / 12)  # f(0) = 1 - hit ratio at R=1


def test_merge_traces_keeps_prompts_apart():
    merged = st.merge_traces([hand_trace(), hand_trace()])
    assert block_steps(merged) == {1: [L1, L1], 2: [L2, L2]}  # not one 6-step block
    with pytest.raises(ValueError, match="traces"):
        st.merge_traces([])


def test_prefix_offset_constant():
    kv = hand_trace()
    prefix = {0: 5, 3: 1}
    full = RoutingTrace(4, [1, 2], [replace(r, counts={e: r.counts.get(e, 0) + prefix.get(e, 0)
                                                      for e in {*r.counts, *prefix}}) for r in kv.records])
    assert st.prefix_offset_constant(kv, full) == (2, 2)
    assert (full.records[3].layer, full.records[3].step) == (2, 0)
    full.records[3] = TraceRecord(0, 0, "denoise", 2, {3: 5})  # layer 2's prefix now changes between its steps
    assert st.prefix_offset_constant(kv, full) == (2, 1)


def test_command_smoke(tmp_path):
    out = tmp_path / "stability"
    args = ["--model", "preset:tiny", "--gen-length", "16", "--block-length", "8", "--steps", "8", "--out", str(out)]
    result = CliRunner().invoke(st.stability, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    shown = {p.name for p in out.iterdir() if not p.name.startswith(".")}  # .tide-run: the run's claim
    assert shown == {"stability.csv", "stability.md", "cosine.png", "hit_ratio.png", "env.json"}
    df = pd.read_csv(out / "stability.csv")
    assert list(df.columns) == COLUMNS and set(df.regime) == {"block-kv", "full"}
    assert {"cosine", "overlap", "hit_ratio", "unique_experts", "drift_d"} <= set(df.metric)
    md = (out / "stability.md").read_text()
    assert "## Comparison with the TIDE paper" in md and "second-hand" in md and "tiny-random" in md
    env = json.loads((out / "env.json").read_text())
    assert env["identical_tokens"] and env["prefix_constant"][0] == env["prefix_constant"][1] > 0
    assert env["machine"]["cpu"] and env["decode"]["gen_length"] == 16 and "tide stability" in env["command"]
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert set(summary) == {"out", "model", "block-kv", "full"}
    again = CliRunner().invoke(st.stability, args)  # results are never overwritten
    assert again.exit_code != 0 and "not empty" in again.output


def test_command_studies_batches_on_the_batch_clock(tmp_path):
    """--batch-sizes: each batch size decodes every prompt batched, studied as its own run; the batched tokens
    are the one-at-a-time tokens; too few distinct prompts for the largest batch is refused, not cycled."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'"prompt number {i}: "\n' for i in range(4)))
    args = ["--model", "preset:tiny", "--prompts", str(prompts), "--gen-length", "16", "--block-length", "8",
            "--steps", "8"]
    result = CliRunner().invoke(st.stability, [*args, "--batch-sizes", "1,4", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    df = pd.read_csv(tmp_path / "s" / "stability.csv")
    assert set(df.run) == {"block-kv", "full", "block-kv, batch 4", "full, batch 4"}
    assert set(df[df.batch_size == 4].regime) == {"block-kv", "full"}
    batch1, batch4 = (df[(df.run == r) & (df.metric == "routed_pairs") & (df.layer == "all")].value.iloc[0]
                      for r in ("block-kv", "block-kv, batch 4"))
    assert batch4 > 2 * batch1  # a batch's forward routes several requests' blocks
    env = json.loads((tmp_path / "s" / "env.json").read_text())
    assert env["identical_batched"] is True and env["batch_sizes"] == [1, 4]
    assert "batch 4" in (tmp_path / "s" / "stability.md").read_text()
    refused = CliRunner().invoke(st.stability, [*args, "--batch-sizes", "8", "--out", str(tmp_path / "t")])
    assert refused.exit_code != 0 and "at least 8 distinct prompts" in refused.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert set(summary) == {"out", "model", "block-kv", "full", "block-kv, batch 4", "full, batch 4"}
