"""`stability`: how stable is expert routing across the denoising steps of a block? (issue #7, part 5)

Owns the stability metrics, pure functions of a RoutingTrace's denoising records: cosine similarity of
per-expert token counts and top-C overlap between steps s and s+k, the token-weighted hit ratio of a top-C
set kept R steps, unique experts per step, and TIDE's drift d (tide.planner.drift_stats, so the cost model
and this study agree). The `stability` command decodes bench/prompts.jsonl in both regimes under the reference
policy, one request at a time and at each `--batch-sizes` (a batch's trace runs on the batch's clock: its forwards,
whatever requests are in them, which is what TIDE refreshes on), and writes stability.csv, stability.md,
cosine.png, hit_ratio.png and env.json to a fresh directory. A "run" is a regime at one batch size.
It times nothing: every number is a count of routed (token, expert) pairs.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tide.options import device_option
from tide.planner import drift_stats, sub_trace, top_set
from tide.trace import RoutingTrace

if TYPE_CHECKING:
    import pandas as pd  # imported inside the functions that need it: `tide --help` should not pay for pandas

Counts = dict[int, int]  # expert -> tokens routed to it in one forward
ALL = "all"  # the layer label of rows pooled over every MoE layer
COLUMNS = ["run", "regime", "batch_size", "layer", "metric", "k_or_R", "C", "value", "n"]  # n: samples behind it
PAPER_ADJACENT_COSINE, PAPER_COSINE_AT_5, LLADA_TOKENS_PER_STEP = 0.985, 0.95, 3.0  # 2nd-hand (shared/design/tide.md)
SHAPE = ("num_hidden_layers", "hidden_size", "num_experts", "num_experts_per_tok")  # recorded in env.json


# ---- pure metrics ------------------------------------------------------------------------------------------
def merge_traces(traces: list[RoutingTrace]) -> RoutingTrace:
    """One trace of several generations; blocks renumbered so blocks of different prompts never share an index."""
    if not traces:
        raise ValueError("traces is empty: decode at least one prompt")
    out, offset = RoutingTrace(traces[0].num_experts, list(traces[0].layers)), 0
    for t in traces:
        out.records += [replace(r, block=r.block + offset) for r in t.records]
        offset += 1 + max((r.block for r in t.records), default=-1)
    return out


def block_steps(trace: RoutingTrace) -> dict[int, list[list[Counts]]]:
    """layer -> one list per block of its denoising steps' counts, in step order (prefill/commit dropped)."""
    seqs: dict[int, dict[int, list]] = {layer: defaultdict(list) for layer in trace.layers}
    for r in trace.records:
        if r.kind == "denoise":
            seqs.setdefault(r.layer, defaultdict(list))[r.block].append((r.step, r.counts))
    return {layer: [[c for _, c in sorted(seq, key=lambda t: t[0])] for _, seq in sorted(blocks.items())]
            for layer, blocks in seqs.items()}


def cosine(a: Counts, b: Counts) -> float:
    """Cosine of two count vectors over all experts (absent = 0); NaN when either step routed nothing."""
    norm = math.sqrt(sum(n * n for n in a.values()) * sum(n * n for n in b.values()))
    return sum(n * b.get(e, 0) for e, n in a.items()) / norm if norm else math.nan


def overlap(a: Counts, b: Counts, c: int) -> float:
    """|top-C(a) & top-C(b)| / C, with top_set's tie rule (more tokens first, then lower expert id)."""
    return len(top_set(a, c) & top_set(b, c)) / c


def window_hits(window: list[Counts], c: int) -> tuple[int, int]:
    """(covered, routed) pairs over the window's steps for the top-C set chosen at its first step."""
    chosen = top_set(window[0], c)
    return sum(n for x in window for e, n in x.items() if e in chosen), sum(sum(x.values()) for x in window)


def lagged(trace: RoutingTrace, max_lag: int, pair: str, c: int = 0) -> dict[int, dict[int, list[float]]]:
    """layer -> k -> the pair metric ('cosine' or 'overlap') of steps (s, s+k), every s and block, k=1..max_lag."""
    fn = {"cosine": cosine, "overlap": lambda a, b: overlap(a, b, c)}[pair]
    return {layer: {k: [v for seq in blocks for s in range(len(seq) - k) if not math.isnan(v := fn(seq[s], seq[s + k]))]
                    for k in range(1, max_lag + 1)} for layer, blocks in block_steps(trace).items()}


def hits_by_window(trace: RoutingTrace, max_window: int, c: int) -> dict[int, dict[int, list[tuple[int, int]]]]:
    """layer -> R -> window_hits of every full window s..s+R-1 inside a block (R = 1..max_window)."""
    return {layer: {w: [window_hits(seq[s: s + w], c) for seq in blocks for s in range(len(seq) - w + 1)]
                    for w in range(1, max_window + 1)} for layer, blocks in block_steps(trace).items()}


def run_label(regime: str, batch_size: int) -> str:
    return regime if batch_size == 1 else f"{regime}, batch {batch_size}"


def study(trace: RoutingTrace, regime: str, sizes: list[int], max_lag: int = 8, max_window: int = 16,
          batch_size: int = 1) -> list[dict]:
    """Long-format rows (COLUMNS) of every metric, per layer and pooled over layers (ALL), top-C for C in sizes.

    Means are over s, blocks and prompts (and layers for ALL). d and f(a) are tide.planner.drift_stats' (per
    layer on its sub-trace, ALL on the whole trace), so this study and the cost model agree."""
    rows: list[dict] = []
    run = dict(run=run_label(regime, batch_size), regime=regime, batch_size=batch_size)

    def add(metric: str, per_layer: dict, k: int | str = "", c: int | str = "", agg=_mean) -> None:
        for layer, vs in [*per_layer.items(), (ALL, [v for x in per_layer.values() for v in x])]:
            rows.append(dict(**run, layer=layer, metric=metric, k_or_R=k, C=c, value=agg(vs), n=len(vs)))

    def by_key(per_layer: dict[int, dict[int, list]], metric: str, c: int | str = "", agg=_mean) -> None:
        for k in range(1, max(max(d, default=0) for d in per_layer.values()) + 1):
            add(metric, {layer: d[k] for layer, d in per_layer.items()}, k, c, agg)

    steps = {layer: [counts for seq in blocks for counts in seq] for layer, blocks in block_steps(trace).items()}
    by_key(lagged(trace, max_lag, "cosine"), "cosine")
    add("unique_experts", {layer: [sum(n > 0 for n in c.values()) for c in cs] for layer, cs in steps.items()})
    add("routed_pairs", {layer: [sum(c.values()) for c in cs] for layer, cs in steps.items()})
    for c in sizes:
        by_key(lagged(trace, max_lag, "overlap", c), "overlap", c)
        hits = hits_by_window(trace, max(2, max_window), c)
        by_key(hits, "hit_ratio", c, _pooled)  # token-weighted: covered / routed pairs, summed over windows
        for layer, part in [*((x, sub_trace(trace, [x])) for x in trace.layers), (ALL, trace)]:
            d, f = drift_stats(part, c, max_window)  # n: the pairs (s, s+1) behind d, (s, s+a) behind f(a)
            n = [sum(len(hits[x][a + 1]) for x in hits if layer in (x, ALL)) for a in range(max(2, max_window))]
            rows += [dict(**run, layer=layer, metric="drift_d", k_or_R="", C=c, value=d, n=n[1]),
                     *[dict(**run, layer=layer, metric="miss_by_age", k_or_R=a, C=c, value=m, n=n[a])
                       for a, m in enumerate(f)]]
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _pooled(pairs: list[tuple[int, int]]) -> float:
    routed = sum(p[1] for p in pairs)
    return sum(p[0] for p in pairs) / routed if routed else math.nan


def prefix_offset_constant(kv: RoutingTrace, full: RoutingTrace) -> tuple[int, int]:
    """(blocks, of which constant): per (layer, block) of one prompt, is full - block-kv counts the same at every
    step? Under the block-causal mask the prefix routes identically at every step, so it should be."""
    a, b = block_steps(kv), block_steps(full)
    pairs = [(sk, sf) for layer in kv.layers for sk, sf in zip(a.get(layer, []), b.get(layer, []), strict=False)]
    offset = lambda k, f: frozenset((e, f.get(e, 0) - k.get(e, 0)) for e in {*f, *k} if f.get(e, 0) != k.get(e, 0))  # noqa: E731
    return len(pairs), sum(len(sk) == len(sf) and len({offset(k, f) for k, f in zip(sk, sf, strict=True)}) == 1
                           for sk, sf in pairs)


# ---- report ------------------------------------------------------------------------------------------------
def pick(df: pd.DataFrame, run: str, metric: str, k: int | str = "", c: int | str = "", layer=ALL) -> tuple:
    row = df[(df.run == run) & (df.metric == metric) & (df.layer.astype(str) == str(layer))
             & (df.k_or_R.astype(str) == str(k)) & (df.C.astype(str) == str(c))]
    return (float(row.value.iloc[0]), int(row.n.iloc[0])) if len(row) else (math.nan, 0)


def wide(df: pd.DataFrame, metric: str, regimes: list[str], sizes: list[int | str], key: str) -> dict[str, list]:
    """Columns of a table: one row per k (or R), one column per regime and C, plus the samples per regime."""
    keys = sorted({int(k) for k in df[df.metric == metric].k_or_R})
    cols: dict[str, list] = {key: [str(k) for k in keys]}
    for regime in regimes:
        for c in sizes:
            cols[regime + (f", C={c}" if c != "" else "")] = [pick(df, regime, metric, k, c)[0] for k in keys]
        cols[f"n ({regime})"] = [str(pick(df, regime, metric, k, sizes[0])[1]) for k in keys]
    return cols


def verdict(df: pd.DataFrame, regime: str, tokens_per_step: float) -> str:
    k = max(1, round(LLADA_TOKENS_PER_STEP / tokens_per_step))  # our steps per LLaDA2.0 step, in committed tokens
    (c1, n1), (c5, n5), (ck, _) = (pick(df, regime, "cosine", x) for x in (1, 5, k))
    far = ("k=5 is not measured (no block had 6 steps)" if n5 == 0 else
           f"cosine at k=5 {c5:.3f} ({n5} pairs) vs > 0.95: " + ("holds" if c5 > PAPER_COSINE_AT_5 else "fails"))
    return (f"- **{regime}**: adjacent-step cosine {c1:.3f} ({n1} step pairs) vs 0.985: "
            f"{'at or above' if c1 >= PAPER_ADJACENT_COSINE else 'below'}; {far}; at equal decoding progress "
            f"(~{LLADA_TOKENS_PER_STEP:.0f} tokens committed, k={k} here) the cosine is {ck:.3f}.")


def markdown(df: pd.DataFrame, env: dict) -> str:
    import pandas as pd

    from tide.bench.report import table

    regimes, sizes, m, dc, hw = env["runs"], env["set_sizes"], env["model_shape"], env["decode"], env["machine"]
    per_layer: dict[str, list] = {"layer": [*sorted({x for x in df.layer if x != ALL}, key=int), ALL]}
    for regime in regimes:
        for metric, k, c, label in [("cosine", 1, "", "cos k=1"), ("cosine", 5, "", "cos k=5"),
                                    ("unique_experts", "", "", "unique experts"), ("routed_pairs", "", "", "pairs"),
                                    *[("drift_d", "", c, f"d C={c}") for c in sizes]]:
            per_layer[f"{regime}: {label}"] = [pick(df, regime, metric, k, c, x)[0] for x in per_layer["layer"]]
    out = [f"# Routing stability across denoising steps: {(name := Path(env['model']).name)}", "",
           f"Command: `{env['command']}`  ",
           f"Commit: {hw['commit']}; machine: {hw['cpu']}, torch {hw['torch']}, {hw['torch_threads']} thread(s)  ",
           f"Model: `{env['model']}`: {m['moe_layers']} MoE layers, {m['num_experts']} routed experts, "
           f"top-{m['num_experts_per_tok']}; reference policy, device {env['device']}  ",
           f"Decode: {env['num_prompts']} prompts (`{env['prompts']}`), gen_length {dc['gen_length']}, block "
           f"{dc['block_length']}, steps {dc['steps']}, threshold {dc['threshold']}, greedy", "",
           *[f"- {r}: {s['blocks']} blocks, {s['mean']:.2f} denoising steps per block (min {s['min']}, max {s['max']}),"
             f" about {dc['block_length'] / s['mean']:.1f} tokens committed per step"
             for r, s in env["steps_per_block"].items()],
           f"- generated tokens identical in both regimes: {env['identical_tokens']}; blocks whose full-minus-block-kv"
           f" counts are the same at every step (the prefix routes identically): {env['prefix_constant'][1]} of "
           f"{env['prefix_constant'][0]}",
           *([f"- batched runs' tokens identical to one request at a time, per request: {env['identical_batched']}"]
             if env.get("identical_batched") is not None else []), "",
           *(["A batched run's steps are the batch's forwards (denoising forward f of the batch is block f // steps, "
              "step f % steps: TIDE's clock), whichever requests are in them; its counts pool every request's "
              "block. The paper's figures are for one request at a time.", ""] if len(regimes) > 2 else []),
           "Only denoising forwards count. Counts: tokens routed to each expert in one forward of one MoE layer (in "
           "`full` the whole prefix too, in `block-kv` the current block). `n`: samples behind a value (step pairs, "
           "steps or windows); s and s+k exist only in blocks of more than k steps. Top-C: most tokens first, ties to "
           f"the lower id (tide.planner.top_set); C = {sizes} of {m['num_experts']} experts.", "",
           "## Comparison with the TIDE paper", "",
           "The paper reports (second-hand: from summaries, not the paper itself) an adjacent-step cosine similarity "
           "of expert activation of 0.985 and > 0.95 five steps apart, on LLaDA2.0 in the full-recompute regime. "
           f"Ours, on `{name}` (not LLaDA2.0), pooled over layers:", "",
           *[verdict(df, r, dc["block_length"] / env["steps_per_block"][r]["mean"]) for r in regimes], "",
           "The paper's activation vector may be defined differently (e.g. gate weights, not token counts). LLaDA2.0 "
           "commits ~3 tokens per step at threshold 0.95 (~10 steps per 32-token block); where a model commits fewer "
           "per step (see above), its k steps span less decoding than the paper's k. In `full` the prefix, identical "
           "at every step of a block, is part of every count vector, which pushes cosine towards 1 by construction; "
           "`block-kv` measures only the tokens being denoised.", "",
           "## Cosine similarity of per-expert token counts, steps s and s+k (all layers)", "",
           table(pd.DataFrame(wide(df, "cosine", regimes, [""], "k")), ".4f"), "", "![cosine](cosine.png)", "",
           "## Overlap of top-C sets, steps s and s+k: |A & B| / C", "", "A top-C set holds only routed experts, so "
           "where a step routes fewer than C (see unique experts per layer below) the overlap stays below 1.", "",
           table(pd.DataFrame(wide(df, "overlap", regimes, sizes, "k")), ".3f"), "",
           "## Token-weighted hit ratio of the top-C set of step s kept for steps s..s+R-1", "",
           "Covered routed pairs / routed pairs, pooled over every full window inside a block.", "",
           table(pd.DataFrame(wide(df, "hit_ratio", regimes, sizes, "R")), ".3f"), "",
           "![hit ratio](hit_ratio.png)", "",
           "## Per layer", "", "Unique experts (given >= 1 token) and routed pairs per step (means); d: TIDE's drift "
           "(tide.planner.drift_stats), the mean share of the top-C set replaced from one step to the next.", "",
           table(pd.DataFrame(per_layer), ".3f"), ""]
    return "\n".join(out)


def plot(df: pd.DataFrame, regimes: list[str], sizes: list[int], out: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state; PNGs render through Agg

    from tide.hub import atomic_write

    for metric, cs, xlabel in [("cosine", [""], "k (steps apart)"), ("hit_ratio", sizes, "R (steps the set is kept)")]:
        fig = Figure(figsize=(6, 4))
        ax, w = fig.subplots(), wide(df, metric, regimes, cs, "x")
        for label in [col for col in w if col != "x" and not col.startswith("n (")]:
            ax.plot([int(x) for x in w["x"]], w[label], "-o", label=label)
        if metric == "cosine":
            ax.axhline(PAPER_ADJACENT_COSINE, ls="--", c="grey", lw=0.8, label="paper k=1 (2nd-hand)")
            ax.axhline(PAPER_COSINE_AT_5, ls=":", c="grey", lw=0.8, label="paper k=5 bound (2nd-hand)")
        ax.set(xlabel=xlabel, ylabel=metric.replace("_", " "), title=f"{metric.replace('_', ' ')}, all layers")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        atomic_write(out / f"{metric}.png", lambda tmp, fig=fig: fig.savefig(tmp, dpi=120, bbox_inches="tight"))


# ---- command -----------------------------------------------------------------------------------------------
@click.command()
@click.option("--model", default=None, help="Checkpoint directory, hub id or preset:NAME [built-in model].")
@click.option("--prompts", "prompts_path", default=None,
              help="JSONL prompts, one JSON string per line [bench/prompts.jsonl].")
@click.option("--gen-length", default=128, show_default=True, help="Tokens to generate at most.")
@click.option("--block-length", default=32, show_default=True, help="Tokens per diffusion block.")
@click.option("--steps", default=32, show_default=True, help="Denoising steps per block at most.")
@click.option("--threshold", default=0.95, show_default=True, help="Commit confidence threshold.")
@click.option("--batch-sizes", default="1", show_default=True,
              help="Comma-separated requests per forward, e.g. 1,4,16: each decodes every prompt at that batch size "
                   "(continuous batching) and is studied on the batch's clock. Needs at least as many prompts as the "
                   "largest batch (bench/prompts-batch.jsonl has 16).")
@click.option("--out", default=None, help="Output directory, new or empty (default: results/stability).")
@device_option("Where the model runs (cpu, cuda, cuda:N).")
def stability(model: str | None, prompts_path: str | None, gen_length: int, block_length: int, steps: int,
              threshold: float, batch_sizes: str, out: str | None, device: str) -> None:
    """Routing stability across denoising steps, both regimes, reference policy, one request at a time and in
    batches (issue #7 part 5, issue 22)."""
    import pandas as pd

    from tide.bench.runner import DEFAULT_PROMPTS, parse_batch_sizes, read_prompts
    from tide.calibrate import machine_stamp
    from tide.config import REGIMES, DecodeConfig
    from tide.decode import Request
    from tide.engine import load
    from tide.hub import atomic_write, new_run_dir, resolve_model, results_root

    fractions, regimes, prompts_path = (0.25, 0.5), list(REGIMES), str(prompts_path or DEFAULT_PROMPTS)
    try:
        path = resolve_model(model)
        cfgs = {r: DecodeConfig(gen_length=gen_length, block_length=block_length, steps=steps, threshold=threshold,
                                regime=r) for r in regimes}
        texts = read_prompts(prompts_path)
        batches = sorted(set(parse_batch_sizes(batch_sizes)) | {1})
        if len(set(texts)) < batches[-1]:
            raise ValueError(f"--batch-sizes {batches[-1]} needs at least {batches[-1]} distinct prompts, "
                             f"{prompts_path} has {len(set(texts))} (copies of a prompt route alike, which would "
                             "understate a batch's union of experts): give --prompts bench/prompts-batch.jsonl")
        run_dir = new_run_dir(out or str(results_root() / "stability"), "stability")
        engine = load(path, device=device)
        prompts = [engine.encode(t) for t in texts]
    except (ValueError, FileNotFoundError) as err:
        raise click.UsageError(str(err)) from None
    sizes = [max(1, round(f * engine.config.num_experts)) for f in fractions]  # C: 25% and 50% of the experts
    runs = {r: [engine.run(ids, cfgs[r], trace=True) for ids in prompts] for r in regimes}
    batched = {(r, b): engine.run_batch([Request(ids, cfgs[r]) for ids in prompts], b, trace=True)
               for r in regimes for b in batches if b > 1}
    labels = [run_label(r, b) for b in batches for r in regimes]
    rows = [row for r in regimes for row in study(merge_traces([x["trace"] for x in runs[r]]), r, sizes)]
    rows += [row for (r, b), x in batched.items() for row in study(x["trace"], r, sizes, batch_size=b)]
    df = pd.DataFrame(rows, columns=COLUMNS)
    pairs = list(zip(runs["block-kv"], runs["full"], strict=True))
    offsets = [prefix_offset_constant(a["trace"], b["trace"]) for a, b in pairs]
    cfg, per_block = engine.config, {r: [s for x in runs[r] for s in x["stats"]["steps_per_block"]] for r in regimes}
    per_block.update({run_label(r, b): x["stats"]["steps_per_block"] for (r, b), x in batched.items()})
    command = shlex.join(["tide", "stability", "--model", str(path), "--prompts", prompts_path, "--gen-length",
                          str(gen_length), "--block-length", str(block_length), "--steps", str(steps), "--threshold",
                          str(threshold), "--batch-sizes", ",".join(map(str, batches)), "--out", str(run_dir),
                          "--device", device])
    env = {"command": command, "model": str(path), "device": device, "prompts": prompts_path,
           "num_prompts": len(prompts), "policy": "reference", "regimes": regimes, "batch_sizes": batches,
           "runs": labels, "fractions": list(fractions),
           "decode": {k: v for k, v in asdict(cfgs["full"]).items() if k != "regime"}, "set_sizes": sizes,
           "model_shape": {"moe_layers": len(cfg.moe_layers), **{k: getattr(cfg, k) for k in SHAPE}},
           "steps_per_block": {r: {"blocks": len(v), "mean": _mean(v), "min": min(v), "max": max(v)}
                               for r, v in per_block.items()},
           "identical_tokens": all(a["tokens"] == b["tokens"] for a, b in pairs),
           "identical_batched": (all(x["tokens"] == [y["tokens"] for y in runs[r]] for (r, _), x in batched.items())
                                 if batched else None),
           "prefix_constant": [sum(t for t, _ in offsets), sum(s for _, s in offsets)],
           "machine": machine_stamp(device, engine.cpu_threads)}
    atomic_write(run_dir / "stability.csv", lambda tmp: df.to_csv(tmp, index=False))  # never half-written
    atomic_write(run_dir / "stability.md", markdown(df, env))
    plot(df, labels, sizes, run_dir)
    atomic_write(run_dir / "env.json", json.dumps(env, indent=2))
    click.echo((run_dir / "stability.md").read_text())
    keys = [("cosine_k1", "cosine", 1, ""), ("cosine_k5", "cosine", 5, ""),
            *[(f"hit_R{w}_C{c}", "hit_ratio", w, c) for w in (4, 8) for c in sizes]]
    summary = {r: {name: round(v, 4) if (v := pick(df, r, metric, k, c)[0]) == v else None  # NaN -> null
                   for name, metric, k, c in keys} for r in labels}
    click.echo(json.dumps({"out": str(run_dir), "model": str(path), **summary}))  # last stdout line: one JSON object
