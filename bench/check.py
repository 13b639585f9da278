"""CI regression checks on a bench run: what the design promises on any machine, never absolute times.

Promised: the lossless contract (levels a and b exactly, c within evals.lossless.TOLERANCE), no failed run, the CSV
schema, and the planner's R no worse in modelled time than R = 1 and the largest R. Not promised, so reported and
not checked: that TIDE moves fewer bytes than LRU or full offload (random weights have no temporal stability to
exploit, and on real ones the planner may buy less CPU time with more copies): `bytes_report`.
"""

from __future__ import annotations

import pandas as pd

from tide.bench.sweep import COLUMNS
from tide.cost import CostModel
from tide.evals.lossless import TOLERANCE
from tide.planner import solve_interval


def check(bench: pd.DataFrame, context: dict, cost: CostModel) -> list[str]:
    """Return the failed checks (empty when all hold)."""
    failures = []
    if list(bench.columns[: len(COLUMNS)]) != COLUMNS:  # the schema
        failures.append(f"bench.csv schema changed: {list(bench.columns[: len(COLUMNS)])}")
    for _, row in bench[bench.kind == "error"].iterrows():
        failures.append(f"{row.variant} at {row.budget} ({row.regime}) failed: {row.error}")
    bench = bench[bench.kind != "error"]
    if bench.truth.isna().all():
        failures.append("no reference or full-offload run: losslessness was not checked")
    for _, row in bench.dropna(subset=["identical_to_reference"]).iterrows():
        where = f"{row.variant} at {row.budget} ({row.regime}, batch {int(row.get('batch_size', 1))})"
        if row.lossless_level == "a" and not bool(row.identical_to_reference):  # level a: exact
            failures.append(f"{where} (no host tier) is not token-identical to {row.truth}")
        if row.lossless_level == "b" and not bool(row.identical_to_tier_matched):  # level b: exact
            failures.append(f"{where} is not token-identical to its tier-matched reference")
        if row.lossless_level in ("b", "c"):  # level c: agreement with the all-device truth, pooled over prompts
            why = TOLERANCE.top1_failure(int(row.top1_flips), int(row.top1_positions))
            if why:
                failures.append(f"{where} against {row.truth}: {why}")
    engine = context["engine"]
    for (budget, regime, batch), (_, trace) in context["profiles"].items():
        steps = max((r.step + 1 for r in trace.records if r.kind == "denoise"), default=1)
        sol = solve_interval(trace, cost.for_expert_bytes(engine.store.expert_bytes), engine.store.slots, steps)
        chosen = next(c for c in sol.candidates if c.interval == sol.interval)
        for end in (sol.candidates[0], sol.candidates[-1]):
            if chosen.objective_s > end.objective_s:
                failures.append(f"planner chose R={sol.interval} at {budget} ({regime}, batch {batch}), worse than "
                                f"R={end.interval}")
    return failures


def bytes_report(bench: pd.DataFrame) -> list[str]:
    """Host->device bytes per policy at each budget and regime (medians over repeats), one line each."""
    bench = bench[bench.kind != "error"]
    bench = bench.assign(batch_size=bench.batch_size.fillna(1).astype(int) if "batch_size" in bench else 1)
    med = bench.groupby(["budget", "regime", "batch_size", "variant"], sort=False).bytes_h2d.median()
    return [f"{budget} ({regime}, batch {batch}): " + ", ".join(f"{v} {b / 1e9:.2f} GB" for v, b in
                                                             grp.droplevel([0, 1, 2]).items())
            for (budget, regime, batch), grp in med.groupby(level=[0, 1, 2], sort=False)]
