#!/usr/bin/env bash
# The mini-shaped CPU bench on the AMX host at three commits, interleaved, two repeats each: issue = aca6b4b (when
# issue 20 was filed: amx-bf16 called once per expert from the executor's workers), prev = 5bb8e8c (the shared job,
# per-thread scratch, AMX's paired token groups), after = the AMX row prefetch. Each checkout is a git worktree;
# each run is one process of that checkout's CLI (PYTHONPATH set to it) with the main checkout's .venv.
# Usage: ab.sh OUT_DIR PYTHON ISSUE_TREE PREV_TREE AFTER_TREE
# Prompts: the three short ones of bench/prompts.jsonl (lines 1, 2, 4), as the AMD host's ab.sh.
set -euo pipefail
out=$1 py=$2
declare -A trees=([issue]=$3 [prev]=$4 [after]=$5)
mkdir -p "$out"
sed -n '1p;2p;4p' "${trees[after]}/bench/prompts.jsonl" > "$out/prompts.jsonl"
args=(bench --model preset:mini --layers 3 --dtype bfloat16 --budgets 64/layer --regime block-kv
      --policies reference,cpu-fallback,tide --gen-length 32 --steps 8 --repeat 1 --projections=
      --prompts "$out/prompts.jsonl")
for round in 1 2; do
  for side in issue prev after; do
    tree=${trees[$side]}
    echo "$(date -u +%H:%M:%S) $side-$round" >&2
    (cd "$tree" && PYTHONPATH="$tree" "$py" -m tide.cli "${args[@]}" --out "$out/$side-$round" > "$out/$side-$round.log" 2>&1)
  done
done
"$py" - "$out" <<'PY'
import sys
from pathlib import Path
import pandas as pd
out = Path(sys.argv[1])
rows = []
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    df = pd.read_csv(run / "bench.csv").set_index("policy")
    ref = df.loc["reference", "tokens_per_s"]
    rows.append({"run": run.name, "commit": df["hw_commit"].iloc[0], "host kernel": df.loc["cpu-fallback", "host_kernel"],
                 "reference tok/s": round(ref, 2),
                 "cpu-fallback / reference": round(df.loc["cpu-fallback", "tokens_per_s"] / ref, 2),
                 "tide / reference": round(df.loc["tide", "tokens_per_s"] / ref, 2),
                 "cpu-fallback host workers s": round(df.loc["cpu-fallback", "cpu_expert_s"], 2)
                 if "cpu_expert_s" in df.columns else None,
                 "level b held": bool(df.loc[["cpu-fallback", "tide"], "identical_to_tier_matched"].all())})
table = pd.DataFrame(rows).sort_values("run", key=lambda r: r.str[-1] + r)
(out / "summary.md").write_text("Tokens/s ratios to the reference run of the same process (from each run's bench.csv; "
                                "written by ab.sh):\n\n" + table.to_markdown(index=False) + "\n")
print((out / "summary.md").read_text())
PY
