"""Click options shared by the `tide` commands (tide.cli, tide.bench.commands, tide.evals.commands).

Each option validates its value where it is parsed, so a bad value fails before anything is loaded or run.
"""

from __future__ import annotations

import click

from tide.config import DTYPES, HOST_KERNELS, REGIMES, default_cpu_threads


def user_error_message(err: ValueError | OSError) -> str:
    """One line for a user error: `FILE: what` for an OSError about a file, else the error's text."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err).strip()


def invoke_for_user(invoke, ctx: click.Context):
    """`invoke(ctx)` with the one error path for user errors: bad input (a ValueError, or an OSError about a
    file) is `error: <what, where, what to do>` and exit code 2, never a traceback. Bugs still raise."""
    try:
        return invoke(ctx)
    except (ValueError, OSError) as err:
        click.echo(f"error: {user_error_message(err)}", err=True)
        ctx.exit(2)


class UserErrorCommand(click.Command):
    """A stand-alone command (python -m ...) with the `tide` group's error path (invoke_for_user)."""

    def invoke(self, ctx: click.Context):
        return invoke_for_user(super().invoke, ctx)


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """The device as the engine will use it: validated, and indexed ("cuda" -> "cuda:<current>")."""
    from tide.device import resolve_device

    try:
        return str(resolve_device(value))
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def device_option(help_text: str = "Where the model and resident experts live (cpu, cuda, cuda:N)."):
    return click.option("--device", default="cpu", show_default=True, callback=check_device, help=help_text)


def cpu_threads_option(help_text: str):
    return click.option("--cpu-threads", type=click.IntRange(min=1), default=None,
                        callback=lambda ctx, p, v: default_cpu_threads() if v is None else v,
                        help=f"{help_text} [default: half the usable cores, at least 1]")


def host_kernel_option():
    return click.option("--host-kernel", type=click.Choice(HOST_KERNELS), default="auto", show_default=True,
                        help="How host-tier experts are computed: torch's swiglu, or a compiled kernel built with "
                             "the C compiler on first use (amx-bf16 and avx512-bf16: bf16; avx512: bf16 and fp32 on "
                             "AVX-512F CPUs; avx2: bf16 and fp32, any x86-64 CPU with AVX2 and FMA). auto: the first "
                             "of amx-bf16, avx512, avx512-bf16, avx2, torch that runs here for this dtype.")


def device_kernel_option():
    return click.option("--device-kernel", type=click.Choice(["swiglu", "grouped"]), default="swiglu",
                        show_default=True,
                        help="How device-tier experts are computed: swiglu (each expert's own GEMMs, resident or "
                             "streamed alike: lossless levels a and b hold by construction) or grouped (two grouped "
                             "GEMMs per layer for the resident experts, fewer launches; torch's grouped GEMM may "
                             "round one expert differently depending on the others, so runs are held to level c).")


def decode_options(f):
    """Options shared by every command that decodes; unset ones come from the checkpoint's generation_config.json,
    else the official defaults."""
    options = [
        click.option("--gen-length", type=int, default=None, help="Tokens to generate at most [default: 256]."),
        click.option("--block-length", type=int, default=None, help="Tokens per diffusion block [default: 32]."),
        click.option("--steps", type=int, default=None, help="Denoising steps per block at most [default: 32]."),
        click.option("--threshold", type=float, default=None, help="Commit every masked token whose confidence "
                     "exceeds this (at least the scheduled number) [default: 0.95]."),
        click.option("--temperature", type=click.FloatRange(min=0), default=None,
                     help="0 = argmax (greedy) [default: 0]."),
        click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens (temperature > 0)."),
        click.option("--top-p", type=float, default=None, help="Nucleus sampling mass (temperature > 0)."),
        click.option("--regime", type=click.Choice(REGIMES), default="block-kv", show_default=True,
                     help="block-kv: finished blocks in a KV cache; full: recompute the prefix every step."),
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                     help="Seed for sampling."),
        click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (one user turn)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def runtime_options(f):
    """Options shared by every command that loads a model."""
    options = [
        device_option(),
        click.option("--dtype", type=click.Choice(DTYPES), default=None,
                     help="Compute dtype (default: the checkpoint's)."),
        click.option("--policy", default="reference", show_default=True,
                     help="Expert placement policy: reference, full-offload, lru, cpu-fallback, accelerate, tide."),
        click.option("--gpu-budget", default=None,
                     help="GPU memory for experts: bytes ('8GiB'), experts per layer ('64/layer') or a share ('50%'). "
                          "Default: all experts."),
        cpu_threads_option("Worker threads for host-computed experts."),
        host_kernel_option(),
        device_kernel_option(),
        click.option("--refresh-interval", default="auto", show_default=True,
                     help="tide: refresh the resident set every R denoising steps; 'auto' = chosen by the planner "
                          "from a profiling trace and the cost model."),
        click.option("--rank", type=click.Choice(["step", "interval"]), default="step", show_default=True,
                     help="tide: rank experts at a refresh by the refresh step's tokens (paper) or by all tokens "
                          "since the last refresh."),
        click.option("--cost-fetch", is_flag=True,
                     help="tide: between refreshes, fetch a miss when copy + GPU time beats CPU time (cost model)."),
        click.option("--per-layer-interval", is_flag=True, help="tide, auto: one R per layer from its own trace."),
        click.option("--prefetch", is_flag=True,
                     help="tide: load the next layer's likely experts on the copy stream while this layer computes."),
        click.option("--profile", "profile_path", type=click.Path(), default=None,
                     help="Hardware profile JSON (tide calibrate). Default: a quick calibration on this machine."),
        click.option("--check-finite/--no-check-finite", default=True, show_default=True,
                     help="Refuse weights holding NaN or infinity (one pass over each tensor as it is read)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


