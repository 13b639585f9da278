"""bench.csv -> bench.md (+ projections.csv) -> bench.png. Tables are generated, never typed.

Medians over repeats with the min-max spread; speed-ups of every policy over every baseline in the same
budget and regime; modelled tables labelled with their cost model; and a plain list of every place where
a baseline beats TIDE, so the reader never has to find it.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import pandas as pd

from tide.bench.sweep import BASELINES

KEYS = ["variant", "budget", "slots_per_layer", "regime", "batch_size"]


def yes_no(s: pd.Series) -> str:
    s = s.dropna()
    return "n/a" if not len(s) else ("yes" if s.astype(bool).all() else "NO")


def summarise(bench: pd.DataFrame) -> pd.DataFrame:
    bench = bench[bench.kind != "error"]
    bench = bench.assign(batch_size=bench.batch_size.fillna(1).astype(int) if "batch_size" in bench else 1)
    for column in ("mb_h2d_per_token", "tokens_per_s_per_request", "host_tokens_per_expert"):
        if column not in bench:
            bench = bench.assign(**{column: float("nan")})
    g = bench.groupby(KEYS, sort=False)
    out = g.agg(tokens_per_s=("tokens_per_s", "median"), tps_min=("tokens_per_s", "min"),
                tps_max=("tokens_per_s", "max"), forwards_per_block=("forwards_per_block", "median"),
                mb_h2d=("bytes_h2d", lambda b: b.median() / 1e6), gpu_hit_ratio=("gpu_hit_ratio", "median"),
                pairs_cpu=("pairs_cpu", "median"), moe_s=("moe_s", "median"),
                per_request=("tokens_per_s_per_request", "median"), mb_per_token=("mb_h2d_per_token", "median"),
                host_tokens_per_expert=("host_tokens_per_expert", "median"),
                level=("lossless_level", "first"), identical=("identical_to_reference", yes_no),
                tier_matched=("identical_to_tier_matched", yes_no), top1=("top1_agreement", "min"),
                top1_flips=("top1_flips", "max"), top1_positions=("top1_positions", "min"),
                refresh_interval=("refresh_interval", "first")).reset_index()
    for base in BASELINES:
        col = f"x_vs_{base}"
        out[col] = None
        for i, row in out.iterrows():
            ref = out[(out.variant == base) & (out.budget == row.budget) & (out.regime == row.regime)
                      & (out.batch_size == row.batch_size)]
            if len(ref) and row.variant != base:
                out.at[i, col] = round(row.tokens_per_s / ref.tokens_per_s.iloc[0], 2)
    return out


def losses(summary: pd.DataFrame) -> list[str]:
    """Every (budget, regime) where a baseline is faster than plain TIDE, in words."""
    lines = []
    for (budget, regime, batch), grp in summary.groupby(["budget", "regime", "batch_size"], sort=False):
        tide = grp[grp.variant == "tide"]
        if not len(tide):
            continue
        t = tide.tokens_per_s.iloc[0]
        for _, b in grp[grp.variant.isin(BASELINES)].iterrows():
            if b.tokens_per_s > t:
                lines.append(f"- {b.variant} beats tide at budget {budget} ({regime}, batch {batch}): "
                             f"{b.tokens_per_s:.2f} vs {t:.2f} tok/s "
                             f"(tide moved {tide.mb_h2d.iloc[0]:.1f} MB, {b.variant} {b.mb_h2d:.1f} MB; "
                             f"CPU pairs {tide.pairs_cpu.iloc[0]:.0f} vs {b.pairs_cpu:.0f})")
    return lines


def number(v) -> str:
    """A cell for people: counts with thousands separators, fixed decimals by size, blanks for missing values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    if isinstance(v, numbers.Real):
        v = float(v)
        if v == 0:
            return "0"
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 1 \
            else f"{v:.3f}" if abs(v) >= 0.001 else f"{v:.2e}"
    return str(v)


def table(df: pd.DataFrame, floatfmt: str | None = None) -> str:
    """A markdown table (pandas' to_markdown) of `df`, every cell formatted by `number`, or floats by `floatfmt`
    where a report's columns share one scale (the stability study's cosines and ratios)."""
    def cell(v) -> str:
        return format(v, floatfmt) if floatfmt and isinstance(v, float) and not math.isnan(v) else number(v)

    cells = df.apply(lambda column: column.map(cell))
    try:
        return cells.to_markdown(index=False, disable_numparse=True)
    except ImportError:  # to_markdown needs tabulate, which a bare GPU machine's Python (make gpu-check) lacks
        rows = [list(map(str, cells.columns)), *cells.astype(str).values.tolist()]
        return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]),
                          *("| " + " | ".join(r) + " |" for r in rows[1:])])


def compact(bench: pd.DataFrame) -> str:
    """The terminal's table: each policy's median tokens/s, its ratio to the reference and TIDE's over it, MB
    host->device and lossless yes/no, one line per run; bench.md keeps every column."""
    s = summarise(bench)
    rows = []
    for _, r in s.iterrows():
        same = (s.regime == r.regime) & (s.batch_size == r.batch_size)
        ref = s[(s.variant == "reference") & same]
        tide = s[(s.variant == "tide") & (s.budget == r.budget) & same]
        lossless = r.identical if r.level == "a" else r.tier_matched if r.level == "b" else f"top1 {r.top1:.3f}"
        rows.append({"policy": r.variant, "budget": r.budget, "regime": r.regime, "batch": r.batch_size,
                     "tok/s": r.tokens_per_s,
                     "x reference": r.tokens_per_s / ref.tokens_per_s.iloc[0] if len(ref) else None,
                     "tide x it": tide.tokens_per_s.iloc[0] / r.tokens_per_s if len(tide) and r.variant != "tide"
                     else None, "MB H2D": r.mb_h2d, "MB/token": r.mb_per_token, "lossless": lossless})
    frame = pd.DataFrame(rows)
    return table(frame if frame.batch.nunique() > 1 else frame.drop(columns=["batch", "MB/token"]))


def markdown(bench: pd.DataFrame, proj: pd.DataFrame | None, card: list[str], command: str) -> str:
    first = bench[bench.kind != "error"].iloc[0] if (bench.kind != "error").any() else bench.iloc[0]
    gpu = first.get("hw_gpu")
    gpu = gpu if isinstance(gpu, str) and gpu else "no GPU (the device tier is the CPU: a fetch is a host memcpy)"
    machine = (f"{gpu}; CPU {first.hw_cpu}, {first.hw_cores} cores, torch {first.hw_torch} with "
               f"{first.hw_torch_threads} intra-op thread(s), {first.cpu_threads} CPU expert worker(s)")
    s = summarise(bench)
    out = [f"# TIDE benchmark: {first.model}", "", f"Command: `{command}`  ", f"Commit: {first.hw_commit}  ",
           f"Machine: {machine}", "", "## Card", "", *[f"- {c}" for c in card], "",
           "## Measured", "", f"*Measured* on the machine above, median of {bench.repeat.nunique()} interleaved "
           "repeat(s) (min-max in brackets). Throughput counts generated tokens up to EOS over wall time. "
           "`x_vs_P`: tokens/s ratio to policy P at the same budget and regime. Lossless contract "
           f"(evals/lossless.py), against the ground truth **{first.truth}**: `level` a (no host tier: `identical` "
           "must be yes) or b (host tier: `tier_matched`, identity with the tier-matched reference, must be yes); "
           "or c (the grouped device kernel: agreement only); `top1`: teacher-forced top-1 agreement with the ground "
           "truth over `top1_positions` positions pooled over the prompts, `top1_flips` the argmaxes that differ "
           "(level c: a binomial test of a flip rate <= 1%, evals/lossless.py; 1 and 0 on a CPU-only machine in "
           "float32).", ""]
    for regime, grp in s.groupby("regime", sort=False):
        shown = grp.assign(tokens_per_s=[f"{m:.2f} [{a:.2f}-{b:.2f}]" for m, a, b in
                                         zip(grp.tokens_per_s, grp.tps_min, grp.tps_max, strict=True)])
        shown = shown.drop(columns=["tps_min", "tps_max", "regime"]).dropna(axis=1, how="all")
        out += [f"### regime {regime}", "", table(shown), ""]
    lost = losses(s)
    out += ["## Where a baseline beats TIDE", ""] + (lost or ["- nowhere in this run"]) + [""]
    failed = bench[bench.kind == "error"]
    if len(failed):
        out += ["## Runs that failed", ""] + [f"- {r.variant} at {r.budget} ({r.regime}, repeat {r.repeat}): {r.error}"
                                              for _, r in failed.iterrows()] + [""]
    if proj is not None and len(proj):
        out += ["## Modelled projections", "", "*Modelled*, not measured: each run's recorded routing is replayed "
                "through a reference machine's cost model (`tide calibrate --estimate`, published rates). "
                "`expert_s` is the modelled expert path only (copies, GPU and CPU experts with overlap); attention "
                "and the rest of the forward are excluded. `oracle_s`: perfect foresight and overlap with the same "
                "slots; `fraction_of_bound` = oracle_s / expert_s."
                + (" The routing is that of a **random-weight** checkpoint (a preset), not LLaDA2.0's: its expert "
                   "popularity and step-to-step stability differ from the trained model's, so these projections "
                   "show the cost model at this expert size, not the paper's speed-up."
                   if bench.model.astype(str).str.endswith("-random").any() else ""), ""]
        for machine, grp in proj.groupby("machine", sort=False):
            several = "batch_size" in grp and grp.batch_size.nunique() > 1  # which batch size each row replays
            cols = ["variant", "budget", "slots_per_layer", "regime", *(["batch_size"] if several else []),
                    "expert_s", "io_s", "cpu_s", "bytes_h2d", "gpu_hit_ratio", "oracle_s", "fraction_of_bound",
                    "refresh_interval"]
            out += [f"### {machine} ({grp.kind.iloc[0]})", "", table(grp[cols]), ""]
    return "\n".join(out) + "\n"


def plot(bench: pd.DataFrame, path: Path, proj: pd.DataFrame | None = None) -> None:
    """bench.png: per regime, tokens/s of every policy at each budget as bars (min-max over repeats as error
    bars), the all-resident reference as a line, y from 0 on one scale for all panels. With projections, a
    second row puts each run's modelled expert-path time per generated token on each reference machine beside
    the MoE layers' time measured here (the projections are seconds of the expert path, not tokens/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summarise(bench)
    panels = list(dict.fromkeys(zip(s.regime, s.batch_size, strict=True)))  # (regime, batch size)
    if not panels:
        return
    batches = len({b for _, b in panels}) > 1
    with_proj = proj is not None and len(proj) > 0
    fig, axes = plt.subplots(1 + with_proj, len(panels), figsize=(6 * len(panels), 4 + 4 * with_proj),
                             squeeze=False, sharey="row")
    for ax, (regime, batch) in zip(axes[0], panels, strict=True):
        grp = s[(s.regime == regime) & (s.batch_size == batch)]
        ref, runs = grp[grp.variant == "reference"], grp[grp.variant != "reference"]
        budgets, variants = list(dict.fromkeys(runs.budget)), list(dict.fromkeys(runs.variant))
        width = 0.8 / max(1, len(variants))
        for j, variant in enumerate(variants):
            rows = runs[runs.variant == variant].set_index("budget").reindex(budgets)
            spread = [rows.tokens_per_s - rows.tps_min, rows.tps_max - rows.tokens_per_s]
            ax.bar(np.arange(len(budgets)) + (j - (len(variants) - 1) / 2) * width, rows.tokens_per_s, width,
                   yerr=spread, capsize=2, label=variant)
        ax.set_xticks(range(len(budgets)), [f"{b} ({int(n)} slots/layer)" for b, n in
                                            zip(budgets, runs.drop_duplicates("budget").slots_per_layer,
                                                strict=True)])
        if len(ref):
            ax.axhline(ref.tokens_per_s.iloc[0], ls="--", color="black", label="reference (all resident)")
        ax.set_title(f"regime {regime}{f', batch {batch}' if batches else ''} (measured; bars: min-max over "
                     "repeats)")
        ax.set_xlabel("GPU expert budget")
        ax.set_ylabel("tokens / s")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    axes[0][0].set_ylim(0, 1.15 * max(s.tps_max.max(), 1e-9))  # shared by every panel
    if with_proj:
        _plot_projections(axes[1], panels, bench, proj)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_projections(axes, panels: list[tuple[str, int]], bench: pd.DataFrame, proj: pd.DataFrame) -> None:
    """Per run: ms per generated token in the MoE layers measured here, beside the modelled expert path on each
    reference machine (hatched), y from 0 on one scale."""
    import numpy as np

    def batch_of(d: pd.DataFrame) -> pd.Series:
        return d.batch_size.fillna(1).astype(int) if "batch_size" in d else pd.Series(1, index=d.index)

    measured = bench[bench.kind != "error"]
    measured = measured.assign(ms=1e3 * measured.moe_s / measured.generated_tokens, batch_size=batch_of(measured))
    measured = measured.groupby(["variant", "budget", "regime", "batch_size"], sort=False).ms.median()
    modelled = proj.assign(ms=1e3 * proj.expert_s / proj.generated_tokens, batch_size=batch_of(proj))
    machines = list(dict.fromkeys(modelled.machine))
    width = 0.8 / (1 + len(machines))
    for ax, (regime, batch) in zip(axes, panels, strict=True):
        mine = modelled[(modelled.regime == regime) & (modelled.batch_size == batch)]
        runs = list(dict.fromkeys(zip(mine.variant, mine.budget, strict=True)))
        x = np.arange(len(runs))
        ax.bar(x - len(machines) * width / 2, [measured.get((v, b, regime, batch), np.nan) for v, b in runs], width,
               label="measured here: MoE layers")
        for j, machine in enumerate(machines):
            rows = mine[mine.machine == machine].set_index(["variant", "budget"])
            ax.bar(x + (j + 1 - len(machines) / 2) * width, [rows.ms.get((v, b), np.nan) for v, b in runs], width,
                   hatch="//", label=f"modelled {machine}: expert path")
        ax.set_xticks(x, [f"{v}\n{b}" for v, b in runs], fontsize=8)
        ax.set_title(f"regime {regime}: ms per generated token")
        ax.set_ylabel("ms / generated token")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    top = max(float(np.nanmax([measured.max(), modelled.ms.max()])), 1e-9)
    axes[0].set_ylim(0, 1.15 * top)  # shared by the row
