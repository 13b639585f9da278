"""The `tide bench` command (click). Thin: every option is checked before anything runs (tide.bench.runner)."""

from __future__ import annotations

import json
import sys

import click

from tide.config import DTYPES
from tide.hub import MODEL_HELP
from tide.options import cpu_threads_option, device_kernel_option, device_option, host_kernel_option


@click.command()
@click.option("--model", "model_dir", default=None, help=MODEL_HELP + " Default: the built-in trained model.")
@click.option("--policies", default="reference,full-offload,lru,cpu-fallback,accelerate,tide", show_default=True,
              help="Comma-separated; tide variants: tide+interval, tide+costfetch, tide+perlayer.")
@click.option("--budgets", default="25%,50%", show_default=True, help="Comma-separated budgets (bytes, N/layer, %).")
@click.option("--regime", "regimes", default="block-kv,full", show_default=True, help="Comma-separated regimes.")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
              help="JSONL file, one JSON string (a prompt) per line (default: bench/prompts.jsonl).")
@click.option("--gen-length", default=64, show_default=True)
@click.option("--block-length", default=32, show_default=True)
@click.option("--steps", default=32, show_default=True)
@click.option("--threshold", default=0.95, show_default=True)
@device_option()
@click.option("--dtype", type=click.Choice(DTYPES), default=None)
@cpu_threads_option("Host-expert workers.")
@host_kernel_option()
@device_kernel_option()
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True,
              help="Interleaved repeats of every run.")
@click.option("--batch-sizes", default="1", show_default=True,
              help="Comma-separated requests per forward (continuous batching); 1 decodes one request at a time "
                   "(the paper's setting). Every batch size decodes the same requests: the prompts, cycled up to "
                   "the largest batch size.")
@click.option("--profile", "profile_path", type=click.Path(), default=None,
              help="Hardware profile for tide's planner (default: a quick calibration on this machine).")
@click.option("--refresh-interval", default="auto", show_default=True, help="tide's R, or auto (planner).")
@click.option("--projections", default="h100-pcie5,a100-pcie4", show_default=True,
              help="Reference machines to project onto (modelled); empty for none.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: results/<date>-<host>-<model>; never overwritten).")
@click.option("--check", is_flag=True, help="Fail unless the CI regression checks hold (bench/check.py).")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template (one user turn).")
@click.option("--layers", type=int, default=None,
              help="With --model preset:NAME: that shape truncated to this many layers (e.g. mini at 4 layers).")
def bench(model_dir, policies, budgets, regimes, prompts_path, gen_length, block_length, steps, threshold, device,
          dtype, cpu_threads, host_kernel, device_kernel, repeat, profile_path, refresh_interval, projections, out,
          check, chat, layers, batch_sizes) -> None:
    """Every policy side by side on one model: bench.csv, bench.md, bench.png, env.json under results/."""
    from tide.bench.runner import run_bench

    summary = run_bench(model_dir, policies, budgets, regimes, prompts_path, gen_length, block_length, steps,
                        threshold, device, dtype, cpu_threads, repeat, profile_path, refresh_interval, projections,
                        out, check, command="tide " + " ".join(sys.argv[1:]), chat=chat, layers=layers,
                        host_kernel=host_kernel, device_kernel=device_kernel, batch_sizes=batch_sizes)
    click.echo(json.dumps(summary))
    if summary.get("failures"):
        sys.exit(1)
