#!/usr/bin/env bash
# The mini-shaped CPU bench before and after the AVX2 host-kernel change of issue 20, interleaved, two repeats each:
# before = b6dbdd2 (the avx2 kernel as it was), after = 7958ae5 (2 x 4 tiles, x held in registers, padded rows).
# Each checkout is a git worktree; each run is one process of that checkout's CLI (PYTHONPATH set to it) with the
# main checkout's .venv. Usage: ab.sh OUT_DIR BEFORE_TREE AFTER_TREE PYTHON
# Prompts: the three short ones of bench/prompts.jsonl (lines 1, 2, 4): with the long MBPP prompts one reference
# run took 14 min on this 2-core AVX2 host, whose "device tier" is torch's bf16 GEMM (0.07 of read bandwidth at 8
# tokens per expert here).
set -euo pipefail
out=$1 before=$2 after=$3 py=$4
mkdir -p "$out"
sed -n '1p;2p;4p' "$after/bench/prompts.jsonl" > "$out/prompts.jsonl"
args=(bench --model preset:mini --layers 3 --dtype bfloat16 --budgets 64/layer --regime block-kv
      --policies reference,cpu-fallback,tide --gen-length 32 --steps 8 --repeat 1 --projections=
      --prompts "$out/prompts.jsonl")
for round in 1 2; do
  for side in before after; do
    tree=$before; [ "$side" = after ] && tree=$after
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
                 "level b held": bool(df.loc[["cpu-fallback", "tide"], "identical_to_tier_matched"].all())})
table = pd.DataFrame(rows).sort_values("run", key=lambda r: r.str[-1] + r)
(out / "summary.md").write_text("Tokens/s ratios to the reference run of the same process (from each run's bench.csv; "
                                "written by ab.sh):\n\n" + table.to_markdown(index=False) + "\n")
print((out / "summary.md").read_text())
PY
