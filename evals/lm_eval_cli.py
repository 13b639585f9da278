"""`tide-lm-eval`: lm-eval's own command line with the `tide` model registered and TIDE's tasks on the path.

Every lm-eval flag works as documented by lm-eval (`--tasks`, `--apply_chat_template`, `--log_samples`,
`--output_path`, `--gen_kwargs`, `--limit`, ...). Unless `--include_path` is given, TIDE's task folder
(tide_arith, tide_arith_mc, tide_humaneval, tide_mbpp_sanitized) is added to lm-eval's own tasks.

    tide-lm-eval --model tide --model_args pretrained=DIR,policy=tide,gpu_budget=128/layer \\
        --tasks tide_mbpp_sanitized --apply_chat_template --confirm_run_unsafe_code --log_samples --output_path out/
"""

from __future__ import annotations

import sys
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
SUBCOMMANDS = ("run", "ls", "validate")


def with_task_dir(argv: list[str]) -> list[str]:
    """argv with `--include_path TASK_DIR` added where lm-eval would read tasks and none is given."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        print(f"note: --include_path given; TIDE's tasks are in {TASK_DIR}", file=sys.stderr)
        return argv
    if not argv or argv[0] in ("-h", "--help") or (argv[0] in SUBCOMMANDS and argv[1:] in ([], ["-h"], ["--help"])):
        return argv
    return [*argv, "--include_path", str(TASK_DIR)]


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import tide.evals.lm_eval_model  # noqa: F401  (registers the `tide` model with lm-eval)

    args = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0] if sys.argv else "tide-lm-eval", *with_task_dir(args)]
    cli_evaluate()


if __name__ == "__main__":
    main()
