"""The `tide` command line (click). Thin: parse, call the library, print. Heavy imports happen inside commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tide import passive_openmp
from tide.config import DTYPES, PRESETS, DecodeConfig, parse_refresh_interval, preset
from tide.hub import MODEL_HELP, write_new
from tide.options import (
    cpu_threads_option,
    decode_options,
    device_option,
    host_kernel_option,
    invoke_for_user,
    runtime_options,
)

passive_openmp()  # before anything loads torch (tide.config, tide.hub and tide.options do not)


THREADS_HELP = ("torch intra-op threads of the main thread [default: the usable cores (os.sched_getaffinity) less "
                "the host-expert workers' default, at least 1]. Accepted before or after the command.")


def _set_threads(ctx: click.Context, param: click.Parameter, threads: int | None) -> None:
    if threads is not None:  # after the command: overrides the group's setting, which ran first
        import torch

        torch.set_num_threads(threads)


class Tide(click.Group):
    """The one error path for user errors: any command's bad input (a ValueError, or an OSError about a file)
    becomes `error: <what, where, what to do>` and exit code 2, never a traceback. Bugs still raise.
    Every command also takes the group's `--threads` after its name, where users put options."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not any(p.name == "threads" for p in cmd.params):
            cmd.params.append(click.Option(["--threads"], type=click.IntRange(min=1), default=None,
                                           expose_value=False, callback=_set_threads, help=THREADS_HELP))
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        return invoke_for_user(super().invoke, ctx)


@click.group(cls=Tide, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threads", type=int, default=None, help=THREADS_HELP)
def main(threads: int | None) -> None:
    """TIDE: lossless expert offloading for MoE diffusion LLMs (LLaDA2.0) on one GPU plus the host CPU."""
    if threads is not None and threads < 1:
        raise click.UsageError(f"--threads must be >= 1, got {threads}")
    import torch

    from tide.config import default_threads

    torch.set_num_threads(threads or default_threads())  # explicit: torch's implicit default behaves differently


@main.command("make-checkpoint")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Model shape: tiny (tests), mini (LLaDA2.0-mini) or flash (LLaDA2.0-flash).")
@click.option("--layers", type=int, default=None, help="Override num_hidden_layers (truncate a big shape).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Stored dtype (default: the preset's).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory to write.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the random weights.")
@click.option("--shard-size", default="2GiB", show_default=True, help="Largest safetensors shard.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (whole: no file of the old model stays).")
def make_checkpoint(preset_name: str, layers: int | None, dtype: str | None, out: str, seed: int,
                    shard_size: str, overwrite: bool) -> None:
    """Write a random-weight checkpoint in the official Hugging Face layout (config, shards, index, tokenizer),
    into a fresh directory that replaces --out only when complete."""
    from tide.budget import parse_bytes
    from tide.checkpoint import write_random_checkpoint
    from tide.hub import model_dir_writer

    overrides = {k: v for k, v in (("num_hidden_layers", layers), ("dtype", dtype)) if v is not None}
    cfg = preset(preset_name, **overrides)
    shard_bytes = parse_bytes(shard_size, "--shard-size")
    if shard_bytes <= 0:
        raise click.BadParameter(f"{shard_size!r}: a shard must hold at least one byte", param_hint="--shard-size")
    with model_dir_writer(out, overwrite) as tmp:
        write_random_checkpoint(cfg, tmp, seed=seed, max_shard_bytes=shard_bytes)
    click.echo(f"wrote {out} ({preset_name}, {cfg.num_hidden_layers} layers, seed {seed})")


@main.command()
@click.option("--model", "model_dir", required=True, help=MODEL_HELP)
@click.option("--prompt", default=None, help="Prompt text (uses the checkpoint's tokenizer).")
@click.option("--prompt-ids", default=None, help="Prompt as comma-separated token ids (instead of --prompt).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), default=None,
              help="JSONL file, one JSON string (a prompt) per line: decode every one, with the same settings "
                   "(instead of --prompt).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --prompts: requests per forward (continuous batching: a finished request leaves, the next "
                   "joins); each request gets the tokens it gets alone. 1 decodes them one at a time.")
@decode_options
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: tokens, text and stats.")
@click.option("--trace", "trace_path", type=click.Path(dir_okay=False), default=None,
              help="Record every layer-forward's routing to this .jsonl or .parquet file.")
def generate(model_dir: str, prompt: str | None, prompt_ids: str | None, prompts_path: str | None, batch_size: int,
             as_json: bool, trace_path: str | None, **kw) -> None:
    """Generate from one prompt (or a file of them) and report throughput and expert traffic.

    \b
    Policies (--policy): reference (all experts on the GPU), full-offload (copy every routed expert every
    forward), lru (LRU expert cache), cpu-fallback (static popular set, misses on the CPU), accelerate
    (Hugging Face accelerate's offload hooks), tide (interval refresh, misses on the CPU).
    """
    if sum(x is not None for x in (prompt, prompt_ids, prompts_path)) != 1:
        raise click.UsageError("give exactly one of --prompt, --prompt-ids or --prompts")
    if batch_size > 1 and prompts_path is None:
        raise click.UsageError("--batch-size batches the requests of --prompts: give --prompts FILE.jsonl")
    texts = None
    if prompts_path is not None:
        from tide.bench.runner import read_prompts

        try:
            texts = read_prompts(prompts_path)
        except (OSError, ValueError) as err:
            raise click.UsageError(f"--prompts: {err}") from None
    if trace_path:
        from tide.trace import check_trace_path

        output_file(trace_path, (".jsonl", ".parquet"), "--trace")
        try:
            check_trace_path(trace_path)
        except ValueError as err:
            raise click.UsageError(f"--trace: {err}") from None
    from tide.decode import Request

    model_dir = _model(model_dir)
    chat = kw.pop("chat")
    decode = {k: kw.pop(k) for k in DECODE_FLAGS}
    _decode_config({k: v for k, v in decode.items() if v is not None})  # bad flags fail before loading
    engine = _load(model_dir, kw, profile_batch=batch_size)  # tide plans R from a profile at this batch size
    cfg = _decode_config({**engine.decode_defaults, **{k: v for k, v in decode.items() if v is not None}})
    try:
        many = [engine.encode(t, chat) for t in texts] if texts is not None else [
            engine.encode(prompt, chat) if prompt is not None else _parse_ids(prompt_ids)]
        result = engine.run_batch([Request(ids, cfg) for ids in many], batch_size, trace=bool(trace_path))
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    stats = {**result["stats"], "policy": kw["policy"], "gpu_budget": kw["gpu_budget"]}
    if trace_path:
        meta = (".meta.json",) if trace_path.endswith(".parquet") else ()  # parquet: its metadata file beside it
        stats["trace"] = str(write_new(trace_path, result["trace"].save, meta))
    if texts is not None:  # one output per request, in the file's order
        outputs = [{"tokens": t, "text": engine.decode(t)} for t in result["tokens"]]
        if as_json:
            click.echo(json.dumps({"outputs": outputs, "stats": stats, "notes": engine.notes}))
            return
        for i, out in enumerate(outputs):
            click.echo(f"-- request {i}\n{out['text']}")
    else:
        tokens = result["tokens"][0]
        if as_json:
            click.echo(json.dumps({"tokens": tokens, "text": engine.decode(tokens), "stats": stats,
                                   "notes": engine.notes}))
            return
        click.echo(engine.decode(tokens))
    click.echo(f"-- {stats['generated_tokens']} tokens in {stats['seconds']:.2f} s "
               f"({stats['tokens_per_s']:.2f} tok/s), "
               f"{stats['forwards']} forwards, {stats['bytes_h2d'] / 1e6:.1f} MB host->GPU, "
               f"GPU hit ratio {stats['gpu_hit_ratio']:.3f}", err=True)


DECODE_FLAGS = ("gen_length", "block_length", "steps", "threshold", "temperature", "top_k", "top_p", "regime", "seed")


def _decode_config(settings: dict) -> DecodeConfig:
    try:
        return DecodeConfig(**settings)
    except (TypeError, ValueError) as err:
        raise click.UsageError(str(err)) from None


def policy_options(kw: dict, model_dir: str) -> dict:
    """Policy keyword arguments from the CLI flags (only tide takes any)."""
    if kw["policy"] != "tide":
        return {}
    r = kw["refresh_interval"]
    opts = {"refresh_interval": refresh_interval(r), "rank": kw["rank"],
            "cost_fetch": kw["cost_fetch"], "per_layer_interval": kw["per_layer_interval"],
            "prefetch_next": kw["prefetch"]}
    if r != "auto" and kw["per_layer_interval"]:
        raise click.UsageError("--per-layer-interval goes with --refresh-interval auto")
    if not opts["per_layer_interval"]:
        opts.pop("per_layer_interval")
    if r == "auto" or kw["cost_fetch"]:
        opts["cost"] = cost_model(model_dir, kw)
    return opts


def cost_model(model_dir: str, kw: dict):
    """The hardware profile named by --profile, else a quick calibration at the checkpoint's expert shape."""
    from tide.calibrate import load_or_calibrate
    from tide.config import ModelConfig
    from tide.engine import torch_dtype

    cfg = ModelConfig.from_json(Path(model_dir) / "config.json")
    if not kw.get("profile_path"):
        click.echo("note: no --profile given; calibrating this machine (a few seconds)", err=True)
    return load_or_calibrate(kw.get("profile_path"), cfg.hidden_size, cfg.moe_intermediate_size,
                             torch_dtype(kw["dtype"], cfg), kw["device"], kw["cpu_threads"],
                             kw.get("host_kernel", "auto"))


def refresh_interval(text: str) -> int | str:
    try:
        return parse_refresh_interval(text)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def _model(spec: str | None) -> Path:
    """The checkpoint directory for --model (tide.hub.resolve_model), notes on stderr, errors as exit 2."""
    from tide.hub import resolve_model

    notes: list[str] = []
    path = resolve_model(spec, notes)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    return path


def _load(model_dir: str | Path, kw: dict, **extra):
    import tide.baselines  # noqa: F401  (registers the baseline policies even without installed entry points)
    import tide.refresh  # noqa: F401
    from tide.engine import load

    options = policy_options(kw, model_dir)
    engine = load(model_dir, policy=kw["policy"], gpu_budget=kw["gpu_budget"], device=kw["device"], dtype=kw["dtype"],
                  cpu_threads=kw["cpu_threads"], check_finite=kw.pop("check_finite", True),
                  host_kernel=kw.get("host_kernel", "auto"), device_kernel=kw.get("device_kernel", "swiglu"),
                  **options, **extra)
    for note in engine.notes:
        click.echo(f"note: {note}", err=True)
    return engine


def output_file(path: str, suffixes: tuple[str, ...], flag: str) -> None:
    """Refuse, before any work, an output file whose folder is missing or whose name the writer cannot use."""
    target = Path(path)
    if target.suffix not in suffixes:
        raise click.UsageError(f"{flag} {path}: use a {' or '.join(suffixes)} file name")
    if not target.parent.is_dir():
        raise click.UsageError(f"{flag} {path}: the folder {target.parent} does not exist; create it first")
    if target.exists() or target.is_symlink():
        raise click.UsageError(f"{flag} {path}: exists; results are never overwritten: choose a new name or "
                               "remove it")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise click.UsageError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


@main.command()
@click.option("--model", "model_dir", default=None, help="Take the expert shape from this checkpoint. " + MODEL_HELP)
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True,
              help="Expert shape when no --model is given.")
@device_option("Device tier to measure (cpu, cuda, cuda:N).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Expert dtype (default: the model's).")
@cpu_threads_option("Host-expert workers to calibrate with (as the executor runs them).")
@host_kernel_option()
@click.option("--estimate", type=click.Choice(["h100-pcie5", "a100-pcie4"]), default=None,
              help="Write a labelled estimate from published rates instead of measuring.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed repetitions per point (median reported).")
@click.option("--max-tokens", type=click.IntRange(min=2), default=1024, show_default=True,
              help="Largest token count measured (1, 2, 4, ... up to it); beyond it the cost model extrapolates "
                   "linearly. A host expert at 1024 tokens is ~13 GFLOP at mini's shape: lower it for a quick run.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Profile JSON to write.")
def calibrate(model_dir, preset_name, device, dtype, cpu_threads, host_kernel, estimate, repeats, max_tokens,
              out) -> None:
    """Measure this machine's expert copy and compute costs (or write an estimate) as a hardware profile."""
    from tide import calibrate as cal
    from tide.config import ModelConfig
    from tide.engine import torch_dtype

    output_file(out, (".json",), "--out")
    cfg = ModelConfig.from_json(_model(model_dir) / "config.json") if model_dir else preset(preset_name)
    dt = torch_dtype(dtype, cfg)
    if estimate:
        cost = cal.estimate(estimate, cfg.hidden_size, cfg.moe_intermediate_size, dt.itemsize)
    else:
        tokens = tuple(n for n in cal.TOKENS if n <= max_tokens)
        cost = cal.calibrate(cfg.hidden_size, cfg.moe_intermediate_size, dt, device, cpu_threads, tokens, repeats,
                             host_kernel)
    write_new(out, cost.to_json)
    click.echo(f"wrote {out} ({cost.source}): fetch {cost.fetch_s() * 1e6:.1f} us/expert "
               f"({cost.h2d_bytes_per_s / 1e9:.1f} GB/s), CPU expert {cost.cpu_s(1) * 1e6:.1f} us at 1 token, "
               f"{cost.cpu_s(32) * 1e6:.1f} us at 32")


@main.command()
@click.option("--model", "model_dir", required=True, help=MODEL_HELP)
@click.option("--gpu-budget", default="25%", show_default=True, help="Bytes, 'N/layer' or a share of the experts.")
@click.option("--profile", "profile_path", type=click.Path(), default=None, help="Hardware profile JSON.")
@click.option("--trace", "trace_path", type=click.Path(), default=None,
              help="Routing trace (tide generate --trace); default: a profiling pass over built-in prompts.")
@click.option("--max-interval", type=click.IntRange(min=1), default=None,
              help="Largest R considered (default: steps in the trace).")
@click.option("--per-layer-interval", is_flag=True, help="Also solve one R per layer.")
@click.option("--objective", type=click.Choice(["sum", "overlap"]), default="sum", show_default=True,
              help="sum: PCIe + CPU seconds (the paper); overlap: modelled wall time, copies, device and host workers "
                   "overlapping as executed.")
@device_option()
@click.option("--dtype", type=click.Choice(DTYPES), default=None)
@cpu_threads_option("Host-expert workers.")
def plan(model_dir, gpu_budget, profile_path, trace_path, max_interval, per_layer_interval, objective, device, dtype,
         cpu_threads) -> None:
    """Choose TIDE's refresh interval R: print the modelled cost of every candidate R and why."""
    from tide.planner import solve_interval
    from tide.trace import RoutingTrace

    kw = {"policy": "lru", "gpu_budget": gpu_budget, "device": device, "dtype": dtype, "cpu_threads": cpu_threads,
          "profile_path": profile_path}
    model_dir = _model(model_dir)
    cost = cost_model(model_dir, kw)
    engine = _load(model_dir, kw)
    if trace_path:
        trace = RoutingTrace.load(trace_path)
    else:
        from tide.config import PROFILE_DECODE, PROFILE_PROMPTS, PROFILE_REQUESTS

        trace = engine.profile([engine.encode(p) for p in PROFILE_PROMPTS[:PROFILE_REQUESTS]], PROFILE_DECODE)[1]
    steps = max_interval or max((r.step + 1 for r in trace.records if r.kind == "denoise"), default=1)
    sol = solve_interval(trace, cost, engine.store.slots, steps, per_layer=per_layer_interval, objective=objective)
    click.echo(f"cost model: {cost.source}; fetch {cost.fetch_s() * 1e6:.1f} us/expert; "
               f"{engine.store.slots} slots/layer; {len(trace.records)} layer-forwards in the trace")
    click.echo(f"drift d = {sol.drift:.3f}; miss ratio by placement age f(a) = "
               + ", ".join(f"{m:.2f}" for m in sol.miss_by_age[:8]))
    click.echo(f"{'R':>4} {'PCIe ms':>10} {'CPU ms':>10} {'total ms':>10} {'overlap ms':>11} {'fetched':>8} {'hit':>6}")
    for c in sol.candidates:
        mark = " <- chosen" if c.interval == sol.interval else ""
        click.echo(f"{c.interval:>4} {c.io_s * 1e3:>10.2f} {c.cpu_s * 1e3:>10.2f} {c.objective_s * 1e3:>10.2f} "
                   f"{c.step_s * 1e3:>11.2f} {c.fetched_experts:>8} {c.gpu_hit_ratio:>6.3f}{mark}")
    click.echo(f"chosen R = {sol.interval} by {sol.method}" + (f"; per layer: {sol.per_layer}" if per_layer_interval
                                                              else "") + f"; the overlap objective picks R = "
               f"{sol.by_overlap}, the sum objective R = "
               f"{min(sol.candidates, key=lambda c: (c.objective_s, -c.interval)).interval}")


def _register_optional_commands() -> None:
    """Commands that live beside the engine: training, the stability study, lm-eval evaluation, reproduction."""
    from tide.bench.commands import bench
    from tide.bench.stability import stability
    from tide.evals.commands import eval_command, reproduce_command
    from tide.train import train

    for command in (bench, train, stability, eval_command, reproduce_command):
        main.add_command(command)


_register_optional_commands()

if __name__ == "__main__":
    main()
