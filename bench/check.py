"""CI regression checks on a bench run: what must hold on any machine, as ratios, never absolute times."""

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
        where = f"{row.variant} at {row.budget} ({row.regime})"
        if row.lossless_level == "a" and not bool(row.identical_to_reference):  # level a: exact
            failures.append(f"{where} (no host tier) is not token-identical to {row.truth}")
        if row.lossless_level == "b":
            if not bool(row.identical_to_tier_matched):  # level b: exact against the tier-matched reference
                failures.append(f"{where} is not token-identical to its tier-matched reference")
            if row.top1_agreement < TOLERANCE.top1_agreement_min:  # level c: agreement within tolerance
                failures.append(f"{where}: teacher-forced top-1 agreement with {row.truth} {row.top1_agreement:.3f} "
                                f"< {TOLERANCE.top1_agreement_min}")
    med = bench.groupby(["variant", "budget", "regime"]).bytes_h2d.median()
    for (variant, budget, regime), tide_bytes in med.items():
        if variant != "tide":
            continue
        for other in ("lru", "full-offload"):
            if (other, budget, regime) in med and not tide_bytes < med[(other, budget, regime)]:
                failures.append(f"tide moved {tide_bytes:.0f} bytes at {budget} ({regime}), not below {other}'s "
                                f"{med[(other, budget, regime)]:.0f}")
    engine = context["engine"]
    for (budget, regime), (_, trace) in context["profiles"].items():
        steps = max((r.step + 1 for r in trace.records if r.kind == "denoise"), default=1)
        sol = solve_interval(trace, cost.for_expert_bytes(engine.store.expert_bytes), engine.store.slots, steps)
        chosen = next(c for c in sol.candidates if c.interval == sol.interval)
        for end in (sol.candidates[0], sol.candidates[-1]):
            if chosen.objective_s > end.objective_s:
                failures.append(f"planner chose R={sol.interval} at {budget} ({regime}), worse than R={end.interval}")
    return failures
