"""The `tide eval` and `tide reproduce` commands (click). Thin: parse, build an EvalSpec, run, print."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from tide.config import DTYPES, REGIMES, parse_refresh_interval
from tide.evals.extras import require_eval_extra
from tide.hub import MODEL_HELP as HUB_MODEL_HELP
from tide.options import cpu_threads_option, device_option

MODEL_HELP = HUB_MODEL_HELP + " Default: the built-in model."


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def shared_options(f):
    """Options of both commands."""
    options = [
        click.option("--model", "model", default=None, help=MODEL_HELP),
        device_option(),
        click.option("--dtype", type=click.Choice(DTYPES), default=None,
                     help="Compute dtype (default: the checkpoint's)."),
        cpu_threads_option("Worker threads for host-computed experts."),
        click.option("--limit", type=click.IntRange(min=1), default=None, help="Samples per task."),
        click.option("--data", type=click.Path(dir_okay=False), default=None,
                     help="Local MBPP-sanitized JSON/JSONL for tide_mbpp_sanitized (offline runs)."),
        click.option("--offline", is_flag=True, help="Never reach the Hugging Face hub (automatic for TIDE's tasks)."),
        click.option("--gen-length", type=int, default=None, help="Tokens to generate; overrides the task's."),
        click.option("--block-length", type=int, default=None, help="Tokens per diffusion block (default 32)."),
        click.option("--steps", type=int, default=None, help="Denoising steps per block at most (default 32)."),
        click.option("--threshold", type=float, default=None, help="Commit confidence threshold (default 0.95)."),
        click.option("--temperature", type=click.FloatRange(min=0), default=None,
                     help="Sampling temperature; > 0 turns sampling on, 0 is greedy (default: the task's)."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                     help="Seed of sampling and Monte Carlo draws."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Generation requests per forward (continuous batching; each request gets the tokens it "
                          "gets alone, up to GEMM rounding), and log-likelihood copies per forward; 1 is the "
                          "paper's setting."),
        click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Data-parallel processes on this machine, one engine each (one per GPU; on a machine "
                          "without one, CPU slices): the command starts itself through torch.distributed.run "
                          "(torchrun's --nproc-per-node). Rank 0 writes the one results directory. For several "
                          "machines run torchrun yourself (README, \"Many GPUs\")."),
        click.option("--shm-dir", type=click.Path(file_okay=False), default=None,
                     help="Where the ranks of one machine share one host master (a tmpfs; default $TIDE_SHM_DIR, "
                          "else /dev/shm). Used with several ranks per machine."),
        click.option("--profile", type=click.Path(dir_okay=False), default=None,
                     help="Hardware profile for TIDE's planner (default: a quick calibration)."),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="Run directory, new or empty (default: results/<date>-<host>-<kind>)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def decode_flags(kw: dict) -> dict:
    decode = {k: kw.pop(k) for k in ("gen_length", "block_length", "steps", "threshold", "temperature")}
    decode = {k: v for k, v in decode.items() if v is not None}
    if "temperature" in decode:
        decode["do_sample"] = decode["temperature"] > 0
    return decode


@click.command("eval")
@shared_options
@click.option("--tasks", default=None, help="Comma-separated lm-eval tasks: TIDE's (tide_arith, tide_arith_mc, "
              "tide_humaneval, tide_mbpp_sanitized) or any of lm-eval's. Default: tide_arith,tide_arith_mc.")
@click.option("--include-path", type=click.Path(file_okay=False), default=None, help="More task YAMLs.")
@click.option("--policies", default="reference,full-offload,lru,cpu-fallback,tide", show_default=True)
@click.option("--budgets", "--gpu-budget", "budgets", default="25%", show_default=True,
              help="Comma-separated budgets for every policy but reference (bytes, N/layer, %).")
@click.option("--regime", "--regimes", "regimes", default="block-kv", show_default=True,
              help="Comma-separated regimes: block-kv, full.")
@click.option("--against", type=click.Choice(["auto", "reference", "full-offload"]), default="auto",
              show_default=True, help="The exact comparison: auto = reference if every expert fits the device, "
                                      "else full-offload.")
@click.option("--apply-chat-template", is_flag=True, help="Wrap prompts in the tokenizer's chat template.")
@click.option("--log-samples", is_flag=True, help="Write lm-eval's per-sample outputs (lm_eval/<run>/).")
@click.option("--mc-samples", type=click.IntRange(min=1), default=None,
              help="Monte Carlo draws per log-likelihood (default 16).")
@click.option("--refresh-interval", default="4", show_default=True, help="tide's R, or auto (planner).")
@click.option("--confirm-run-unsafe-code", is_flag=True, help="Allow tasks that execute generated code.")
@click.option("--check-lossless", is_flag=True, help="Exit 1 if any policy's outputs differ from the comparison's.")
def eval_command(**kw) -> None:
    """Accuracy with lm-evaluation-harness under each policy, with throughput and losslessness from the same runs."""
    require_eval_extra("tide eval")
    from tide.evals.harness import EvalSpec, run_eval

    if started_ranks(kw.pop("nproc")):
        return
    for name in ("policies", "budgets", "regimes", "tasks"):
        kw[name] = _csv(kw[name])
    bad = [r for r in kw["regimes"] if r not in REGIMES]
    if bad:
        raise click.UsageError(f"--regime {bad}: choose from {REGIMES}")
    check = kw.pop("check_lossless")
    kw["confirm_unsafe_code"] = kw.pop("confirm_run_unsafe_code")
    try:
        kw["refresh_interval"] = parse_refresh_interval(kw["refresh_interval"])
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    kw["tasks"] = kw["tasks"] or None
    spec = EvalSpec(decode=decode_flags(kw), command=shlex.join(["tide", *sys.argv[1:]]),
                    **{k: v for k, v in kw.items() if v is not None})
    summary = run_eval(spec)[0]
    if summary["out"] is None:  # a data-parallel rank other than 0: rank 0 prints and writes
        return
    click.echo((Path(summary["out"]) / "eval.md").read_text())
    click.echo(json.dumps(summary))
    if check and summary["lossy"]:
        sys.exit(1)


@click.command("reproduce")
@shared_options
@click.option("--tasks", default=None, help="Default: tide_mbpp_sanitized (tide_arith on the built-in model).")
@click.option("--policies", default=None, help="Default: every policy.")
@click.option("--budgets", default=None, help="Default: the paper's (128/layer,64/layer for mini; 64,32 for flash).")
@click.option("--regimes", default=None, help="Default: block-kv,full.")
def reproduce_command(**kw) -> None:
    """The paper's MBPP experiment: every policy x budget x regime, pass@1 and tok/s, beside the paper's figures.

    \b
    On a GPU box, with LLaDA2.0 and MBPP sanitized on local disk (README, "Reproduce the paper"):
      tide reproduce --model /data/LLaDA2.0-mini --device cuda --data /data/mbpp/data/sanitized-mbpp.json
      tide reproduce --model /data/LLaDA2.0-flash --device cuda --data /data/mbpp/data/sanitized-mbpp.json
    The budgets default to the paper's (128/layer and 64/layer for mini, 64 and 32 for flash); --limit 20 is a
    first look. Without --model: the same pipeline on the built-in model and its task (a check of the
    pipeline, not of the paper's numbers).
    """
    require_eval_extra("tide reproduce")
    if started_ranks(kw.pop("nproc")):
        return
    from tide.config import ModelConfig
    from tide.evals.reproduce import paper_model, reproduce_spec, run_reproduce
    from tide.hub import resolve_model

    builtin = kw["model"] is None

    path = resolve_model(kw.pop("model"))
    cfg = ModelConfig.from_json(path / "config.json")
    lists = {k: _csv(kw.pop(k)) for k in ("tasks", "policies", "budgets", "regimes")}
    spec = reproduce_spec(str(path), cfg, _has_chat_template(path), builtin, decode_flags(kw), **lists, **kw)
    spec.command = shlex.join(["tide", *sys.argv[1:]])
    summary = run_reproduce(spec, paper_model(cfg))
    if summary["report"] is None:  # a data-parallel rank other than 0
        return
    click.echo(Path(summary["report"]).read_text())
    click.echo(json.dumps(summary))


def started_ranks(nproc: int) -> bool:
    """With --nproc N > 1 outside a launcher: run this command again as N ranks under torch.distributed.run and
    exit with its code (True: done here). Under a launcher (WORLD_SIZE set), --nproc N must match it."""
    from tide.evals.distributed import from_env, relaunch

    group = from_env()
    if group.active:
        if nproc not in (1, group.local_world_size):
            raise click.UsageError(f"--nproc {nproc}, but the launcher started {group.local_world_size} processes "
                                   "on this machine: give one or the other")
        return False
    if nproc == 1:
        return False
    sys.exit(relaunch(nproc, sys.argv[1:]))


def _has_chat_template(path) -> bool:
    """Whether the checkpoint's tokenizer, loaded as the engine loads it, has a chat template (wherever it keeps
    it: tokenizer_config.json or chat_template.jinja)."""
    from tide.checkpoint import load_tokenizer

    tokenizer = load_tokenizer(path)
    return bool(tokenizer is not None and getattr(tokenizer, "chat_template", None))
