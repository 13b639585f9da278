"""The `tide` command line (click). Thin: parse, call the library, print. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import sys
import time

import click

from tide.config import DTYPES, PRESETS, REGIMES, DecodeConfig, preset


def decode_options(f):
    """Options shared by every command that decodes."""
    options = [
        click.option("--gen-length", default=256, show_default=True, help="Tokens to generate at most."),
        click.option("--block-length", default=32, show_default=True, help="Tokens per diffusion block."),
        click.option("--steps", default=32, show_default=True, help="Denoising steps per block at most."),
        click.option("--threshold", default=0.95, show_default=True,
                     help="Commit every masked token whose confidence exceeds this (at least the scheduled number)."),
        click.option("--temperature", default=0.0, show_default=True, help="0 = argmax (greedy)."),
        click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens (temperature > 0)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (temperature > 0)."),
        click.option("--regime", type=click.Choice(REGIMES), default="block-kv", show_default=True,
                     help="block-kv: finished blocks in a KV cache; full: recompute the prefix every step."),
        click.option("--seed", default=0, show_default=True, help="Seed for sampling."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def runtime_options(f):
    """Options shared by every command that loads a model."""
    options = [
        click.option("--device", default="cpu", show_default=True, help="Where the model and resident experts live."),
        click.option("--dtype", type=click.Choice(DTYPES), default=None,
                     help="Compute dtype (default: the checkpoint's)."),
        click.option("--policy", default="reference", show_default=True,
                     help="Expert placement policy: reference, full-offload, lru, cpu-fallback, accelerate."),
        click.option("--gpu-budget", default=None,
                     help="GPU memory for experts: bytes ('8GiB'), experts per layer ('64/layer') or a share ('50%'). "
                          "Default: all experts."),
        click.option("--cpu-threads", default=1, show_default=True, help="Worker threads for host-computed experts."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """TIDE: lossless expert offloading for MoE diffusion LLMs (LLaDA2.0) on one GPU plus the host CPU."""


@main.command("make-checkpoint")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Model shape: tiny (tests), mini (LLaDA2.0-mini) or flash (LLaDA2.0-flash).")
@click.option("--layers", type=int, default=None, help="Override num_hidden_layers (truncate a big shape).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Stored dtype (default: the preset's).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--shard-size", default="2GiB", show_default=True, help="Largest safetensors shard.")
def make_checkpoint(preset_name: str, layers: int | None, dtype: str | None, out: str, seed: int,
                    shard_size: str) -> None:
    """Write a random-weight checkpoint in the official Hugging Face layout (config, shards, index, tokenizer)."""
    from accelerate.utils import convert_file_size_to_int

    from tide.checkpoint import write_random_checkpoint

    overrides = {k: v for k, v in (("num_hidden_layers", layers), ("dtype", dtype)) if v is not None}
    try:
        cfg = preset(preset_name, **overrides)
        path = write_random_checkpoint(cfg, out, seed=seed, max_shard_bytes=convert_file_size_to_int(shard_size),
                                       tokenizer=cfg.vocab_size < 1024)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(f"wrote {path} ({preset_name}, {cfg.num_hidden_layers} layers, seed {seed})")


@main.command()
@click.option("--model", "model_dir", type=click.Path(), required=True, help="Checkpoint directory.")
@click.option("--prompt", default=None, help="Prompt text (uses the checkpoint's tokenizer).")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids (instead of --prompt).")
@decode_options
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text and stats.")
def generate(model_dir: str, prompt: str | None, prompt_ids: str | None, as_json: bool, **kw) -> None:
    """Generate from one prompt and report throughput and expert traffic."""

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt or --prompt-ids")
    cfg = _decode_config(kw)
    engine = _load(model_dir, kw)
    ids = engine.encode(prompt) if prompt is not None else _parse_ids(prompt_ids)
    t0 = time.perf_counter()
    gen = engine.generate(ids, cfg)
    seconds = time.perf_counter() - t0
    counters = engine.executor.finish()
    stats = {"forwards": gen.forwards, "steps_per_block": gen.steps_per_block, "seconds": seconds,
             "tokens_per_s": len(gen.tokens) / seconds if seconds > 0 else 0.0, "generated_tokens": len(gen.tokens),
             "policy": kw["policy"], "gpu_budget": kw["gpu_budget"], "slots_per_layer": engine.store.slots,
             "regime": cfg.regime, **counters.totals(),
             "routed_tokens_per_layer": counters.routed_tokens_per_layer()}
    text = engine.decode(gen.tokens)
    if as_json:
        click.echo(json.dumps({"tokens": gen.tokens, "text": text, "stats": stats, "notes": engine.notes}))
        return
    click.echo(text)
    click.echo(f"-- {len(gen.tokens)} tokens in {seconds:.2f} s ({stats['tokens_per_s']:.2f} tok/s), "
               f"{gen.forwards} forwards, {stats['bytes_h2d'] / 1e6:.1f} MB host->GPU, "
               f"GPU hit ratio {stats['gpu_hit_ratio']:.3f}", err=True)


def _decode_config(kw: dict) -> DecodeConfig:
    try:
        return DecodeConfig(gen_length=kw.pop("gen_length"), block_length=kw.pop("block_length"),
                            steps=kw.pop("steps"), threshold=kw.pop("threshold"), temperature=kw.pop("temperature"),
                            top_k=kw.pop("top_k"), top_p=kw.pop("top_p"), regime=kw.pop("regime"), seed=kw.pop("seed"))
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def _load(model_dir: str, kw: dict, **extra):
    import baselines  # noqa: F401  (registers the baseline policies even without installed entry points)
    from tide.engine import load

    try:
        engine = load(model_dir, policy=kw["policy"], gpu_budget=kw["gpu_budget"], device=kw["device"],
                    dtype=kw["dtype"], cpu_threads=kw["cpu_threads"], **extra)
    except (ValueError, FileNotFoundError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    for note in engine.notes:
        click.echo(f"note: {note}", err=True)
    return engine


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.UsageError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


if __name__ == "__main__":
    main()
