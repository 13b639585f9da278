"""CI regression checks on a bench run: what must hold on any machine, as ratios, never absolute times."""

from __future__ import annotations

import pandas as pd

from tide.bench.sweep import COLUMNS
from tide.cost import CostModel
from tide.planner import solve_interval


def check(bench: pd.DataFrame, context: dict, cost: CostModel) -> list[str]:
    """Return the failed checks (empty when all hold)."""
    failures = []
    if list(bench.columns[: len(COLUMNS)]) != COLUMNS:
        failures.append(f"bench.csv schema changed: {list(bench.columns[: len(COLUMNS)])}")
    checked = bench.dropna(subset=["identical_to_reference"])
    if "reference" not in set(bench.policy):
        failures.append("no reference run: losslessness was not checked")
    bad = checked[~checked.identical_to_reference.astype(bool)]
    for _, row in bad.iterrows():
        failures.append(f"{row.variant} at {row.budget} ({row.regime}) is not token-identical to the reference")
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
