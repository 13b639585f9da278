"""`tide-lm-eval`: lm-eval's own command line with the `tide` model registered and TIDE's tasks on the path.

Every lm-eval flag works as documented by lm-eval (`--tasks`, `--apply_chat_template`, `--log_samples`,
`--output_path`, `--gen_kwargs`, `--limit`, ...). Unless `--include_path` is given, TIDE's task folder
(tide_arith, tide_arith_mc, tide_humaneval, tide_mbpp_sanitized) is added to lm-eval's own tasks.

    tide-lm-eval --model tide --model_args pretrained=DIR,policy=tide,gpu_budget=128/layer \\
        --tasks tide_mbpp_sanitized --apply_chat_template --confirm_run_unsafe_code --log_samples --output_path out/

Data parallel (one process per GPU, lm-eval's protocol: evals/distributed.py): `torchrun --nproc-per-node N -m
tide.evals.lm_eval_cli ...` or `accelerate launch --multi_gpu --num_processes N -m tide.evals.lm_eval_cli ...`; the
ranks of a machine share one host master (model_args `shm_dir`, default /dev/shm). A rank that fails prints one
`error: rank R of N (host): ...` line and exits; the launcher stops the others.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent / "tasks"
SUBCOMMANDS = ("run", "ls", "validate")
PREFACE = f"""tide-lm-eval: lm-eval's own command line (its help follows) with the `tide` model registered and TIDE's
tasks ({TASK_DIR}) on its task path.

Why not plain `lm_eval --model tide`: lm-eval 0.4 has no plugin discovery; a model exists for it only once its
module is imported, and `lm_eval` imports none of ours. The one-line alternative to this command:
  python -c "import tide.evals.lm_eval_model, lm_eval.__main__ as m; m.cli_evaluate()" --model tide \\
      --include_path {TASK_DIR} ...
"""


def with_task_dir(argv: list[str]) -> list[str]:
    """argv with `--include_path TASK_DIR` added where lm-eval would read tasks and none is given."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        print(f"note: --include_path given; TIDE's tasks are in {TASK_DIR}", file=sys.stderr)
        return argv
    if not argv or argv[0] in ("-h", "--help") or (argv[0] in SUBCOMMANDS and argv[1:] in ([], ["-h"], ["--help"])):
        return argv
    return [*argv, "--include_path", str(TASK_DIR)]


def main(argv: list[str] | None = None) -> None:
    from tide import passive_openmp

    passive_openmp()  # before lm-eval loads torch, as `tide` does (README, "Threads")
    from tide.evals.extras import require_eval_extra

    try:
        require_eval_extra("tide-lm-eval")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    import tide.evals.lm_eval_model  # noqa: F401  (registers the `tide` model with lm-eval)

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(PREFACE)
    sys.argv = [sys.argv[0] if sys.argv else "tide-lm-eval", *with_task_dir(args)]
    from tide.evals.distributed import from_env

    group = from_env()
    try:
        cli_evaluate()
    except (ValueError, OSError) as err:  # bad input (model_args, files, a missing chat template): a sentence
        message = f"{err.filename}: {err.strerror or err}" if isinstance(err, OSError) and err.filename else err
        print(f"error: {where(group)}{message}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # under a launcher: one sentence naming the rank; torchrun's agent stops the others
        if not group.active:
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        if peer_lost(err):
            print(f"error: {where(group)}stopped: another rank failed or left ({type(err).__name__}: {first})",
                  file=sys.stderr)
        else:
            print(f"error: {where(group)}{type(err).__name__}: {first}", file=sys.stderr)
        sys.exit(1)


def peer_lost(err: Exception) -> bool:
    """A collective that failed because a peer process died (gloo / NCCL), not this rank's own error."""
    import torch.distributed as dist

    text = str(err)
    return isinstance(err, getattr(dist, "DistError", ())) or any(
        s in text for s in ("closed by peer", "remote worker", "Connection reset", "NCCL communicator was aborted"))


def where(group) -> str:
    return f"rank {group.rank} of {group.world_size} ({socket.gethostname()}): " if group.active else ""


if __name__ == "__main__":
    main()
