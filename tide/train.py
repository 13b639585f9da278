"""`tide train`: the built-in model, a LLaDA2.0-architecture MoE diffusion LM trained from scratch on CPU.

Owns the training loop: the block-diffusion masked objective, the trainable expert executor, aux-loss-free
load balancing (`expert_bias`), export in the official checkpoint layout, and `evaluate_tasks`. The model
is `tide.model.LLaDA2Model` as is: the routed experts are computed by `TrainableExperts` with the same
`group_by_expert` / `swiglu` / `combine` as inference, so training and decoding run the same math.
Data comes from `tide.data`. Knows nothing about placement policies.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from tide import data
from tide.checkpoint import expert_name, save_tokenizer, write_checkpoint
from tide.config import DecodeConfig, ModelConfig, preset
from tide.decode import Generation, generate
from tide.experts.executor import combine, group_by_expert, swiglu
from tide.model import LLaDA2Model, block_causal_mask
from tide.policy import StepInfo


@dataclass(frozen=True)
class TrainConfig:
    out: str
    seed: int = 0
    steps: int = 1600
    batch_size: int = 20  # code rows of seq_len per step
    task_batch_size: int = 24  # task rows of one block per step
    seq_len: int = 128
    block_length: int = 32  # = DecodeConfig.block_length, the block the decoder denoises
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    bias_rate: float = 1e-3  # expert_bias step per optimizer step (DeepSeek-V3's gamma)
    eps: float = 0.1  # mask ratio t ~ U(eps, 1), per block
    vocab_size: int = 2048
    hidden_size: int = 256
    num_hidden_layers: int = 5
    num_experts: int = 32
    moe_intermediate_size: int = 64
    threads: int = 2  # ~1.5x faster than 1 on two idle cores; use 1 when another process shares them
    log_every: int = 50
    eval_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "task_batch_size", "seq_len", "block_length", "threads", "log_every",
                     "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train field {name!r} must be positive, got {getattr(self, name)}")
        if self.seq_len % self.block_length:
            raise ValueError(f"train field 'seq_len' ({self.seq_len}) must be a multiple of block_length")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"train field 'eps' must be in (0, 1), got {self.eps}")


def model_config(tc: TrainConfig, ids: dict[str, int]) -> ModelConfig:
    """LLaDA2 structure at small scale: layer 0 dense, the rest MoE with grouped top-k and one shared expert."""
    return preset("tiny", vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, num_hidden_layers=tc.num_hidden_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=tc.hidden_size // 4,
                  intermediate_size=2 * tc.hidden_size, moe_intermediate_size=tc.moe_intermediate_size,
                  num_experts=tc.num_experts, num_experts_per_tok=4, n_group=4, topk_group=2, dtype="bfloat16", **ids)


class TrainableExperts(nn.Module):
    """The routed experts as parameters, per MoE layer: gate_up [E, 2I, H], down [E, H, I]; an ExpertExecutor.

    One tensor per layer, not one [L, E, ...] tensor: indexing a stacked tensor costs a backward that zero-fills
    the whole stack for every layer call (with the per-expert slicing `forward` now avoids, about a fifth of
    a training step's CPU time in a torch profile).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        L, E, I, H = len(cfg.moe_layers), cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.index = {layer: i for i, layer in enumerate(cfg.moe_layers)}
        self.gate_up = nn.ParameterList(nn.Parameter(torch.empty(E, 2 * I, H)) for _ in range(L))
        self.down = nn.ParameterList(nn.Parameter(torch.empty(E, H, I)) for _ in range(L))
        self.register_buffer("loads", torch.zeros(L, E))  # tokens per expert since the last bias update

    def forward(self, layer: int, x: Tensor, ids: Tensor, weights: Tensor, at: StepInfo) -> Tensor:
        i, k = self.index[layer], ids.shape[1]
        gate_up, down = self.gate_up[i].unbind(0), self.down[i].unbind(0)  # one backward op per layer, not per expert
        counts = torch.bincount(ids.reshape(-1), minlength=self.loads.shape[1])
        self.loads[i] += counts
        order, ranges = group_by_expert(ids, counts.tolist())
        xs = x[order // k]  # [N*k, H] inputs in expert order
        # Expert ranges tile [0, N*k) in expert order, so cat equals inference's `out[s:t] = swiglu(...)`.
        # split, not xs[s:t]: a slice's backward zero-fills all of xs once per expert.
        chunks = xs.split([t - s for s, t in ranges.values()])
        out = torch.cat([swiglu(c, gate_up[e], down[e]) for e, c in zip(ranges, chunks, strict=True)])
        return combine(out, weights, order, x.dtype)

    def tensors(self, cfg: ModelConfig):
        """(name, tensor) under the official per-expert names."""
        for layer, i in self.index.items():
            for e in range(cfg.num_experts):
                gate, up = self.gate_up[i][e].detach().chunk(2, dim=0)
                yield expert_name(layer, e, "gate_proj"), gate
                yield expert_name(layer, e, "up_proj"), up
                yield expert_name(layer, e, "down_proj"), self.down[i][e].detach()


def init_weights(model: LLaDA2Model, experts: TrainableExperts, seed: int) -> None:
    """N(0, 0.02) everywhere, residual outputs scaled by 1/sqrt(2 * layers) (GPT-2), norms 1, biases 0."""
    gen = torch.Generator().manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *experts.named_parameters()]:
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                residual_out = name.endswith(("dense.weight", "down_proj.weight")) or name.startswith("down.")
                std = out_std if residual_out else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def diffusion_loss(model: LLaDA2Model, ids: Tensor, maskable: Tensor, block_length: int, eps: float,
                   gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Block-diffusion masked objective on ids [B, T]; returns (1/t-weighted loss, mean CE on masked tokens).

    Each block gets its own ratio t ~ U(eps, 1); its maskable tokens are masked with probability t and
    predicted from the clean previous blocks plus the noisy block itself, as the decoder sees them. The
    clean pass writes K/V (with grad) into a KVCache; the noisy pass at the same positions attends to
    [clean | noisy] keys under a [T, 2T] mask (BD3-LM's vectorised form, through the unmodified model).
    """
    B, T = ids.shape
    cfg = model.config
    t = eps + (1 - eps) * torch.rand(B, T // block_length, generator=gen)
    t_tok = t.repeat_interleave(block_length, dim=1)  # [B, T]
    masked = (torch.rand(B, T, generator=gen) < t_tok) & maskable
    noisy = torch.where(masked, torch.full_like(ids, cfg.mask_token_id), ids)
    if T > block_length:
        cache = model.new_cache()
        model(ids, 0, block_causal_mask(T, block_length), cache, True, logits_last=1)
        block = torch.arange(T) // block_length
        mask = torch.cat([block[:, None] > block[None, :], block[:, None] == block[None, :]], dim=1)  # [T, 2T]
        logits = model(noisy, 0, mask, cache, False)
    else:
        logits = model(noisy, 0, None)
    ce = F.cross_entropy(logits[masked], ids[masked], reduction="none")
    return (ce / t_tok[masked]).sum() / maskable.sum(), ce.mean()


@torch.no_grad()
def update_expert_bias(model: LLaDA2Model, experts: TrainableExperts, rate: float) -> None:
    """Aux-loss-free balancing: bias += rate * sign(mean load - load); the bias only steers selection."""
    for moe in model.moe_layers():
        load = experts.loads[experts.index[moe.layer_idx]]
        moe.gate.expert_bias += rate * torch.sign(load.mean() - load)
    experts.loads.zero_()


@dataclass
class ModelEngine:
    """Just what `evaluate_tasks` needs from an Engine, for a model still in training."""

    model: LLaDA2Model
    tokenizer: Any  # a `tokenizers.Tokenizer`

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt: list[int], cfg: DecodeConfig) -> Generation:
        c = self.model.config
        return generate(self.model, prompt, cfg, c.mask_token_id, c.eos_token_id)


def evaluate_tasks(engine: Any, n: int = 200, seed: int = 1, cfg: DecodeConfig | None = None) -> dict[str, Any]:
    """Exact match on n held-out generated tasks, decoded greedily (block-kv, temperature 0) by the engine."""
    cfg = cfg or DecodeConfig(gen_length=32, block_length=32, steps=32)
    hits: dict[str, list[bool]] = {f: [] for f in data.FAMILIES}
    samples = []
    for task in data.tasks(n, seed, held_out=True):
        text = engine.decode(engine.generate(engine.encode(task.prompt), cfg).tokens).strip()
        hits[task.family].append(text == task.answer)
        if len(samples) < 6:
            samples.append({"prompt": task.prompt, "expected": task.answer, "got": text})
    total = [h for v in hits.values() for h in v]
    return {"exact_match": sum(total) / max(1, len(total)), "n": len(total), "samples": samples,
            "by_family": {f: sum(v) / max(1, len(v)) for f, v in hits.items()}}


@torch.no_grad()
def held_out_loss(model: LLaDA2Model, stream: Tensor, tc: TrainConfig, num_batches: int = 4) -> float:
    """Mean masked-token cross-entropy (nats) on held-out files, fixed windows and masks."""
    gen = torch.Generator().manual_seed(1234)
    losses = [diffusion_loss(model, *data.code_batch(stream, tc.batch_size, tc.seq_len, gen), tc.block_length,
                             tc.eps, gen)[1].item() for _ in range(num_batches)]
    return sum(losses) / len(losses)


def fit(tc: TrainConfig) -> dict[str, Any]:
    """Train, export to tc.out (config, bf16 safetensors, tokenizer, metrics.json, loss_curve.png); return metrics."""
    torch.manual_seed(tc.seed)
    torch.set_num_threads(tc.threads)
    out = Path(tc.out)
    t_start = time.perf_counter()
    train_files, held_files = data.split_files(data.stdlib_files())
    train_texts = [p.read_text(errors="replace") for p in train_files]
    task_texts = [t.prompt + t.answer for t in data.tasks(5000, tc.seed)]
    tok = data.train_tokenizer(train_texts + task_texts, tc.vocab_size)
    stream = data.encode_documents(tok, train_texts)
    held = data.encode_documents(tok, [p.read_text(errors="replace") for p in held_files])
    cfg = model_config(tc, data.special_token_ids(tok))
    model, experts = LLaDA2Model(cfg), TrainableExperts(cfg)
    init_weights(model, experts, tc.seed)
    # A bound method, not the module: nn.Module.__setattr__ would register the experts inside every MoE layer
    # (duplicating them in state_dict). Their parameters go to the optimizer explicitly below.
    model.set_executor(experts.__call__)
    params = [*model.named_parameters(), *experts.named_parameters()]
    opt = torch.optim.AdamW([{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                             {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=tc.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / tc.warmup_steps) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / tc.steps)))))
    gen, sampler = torch.Generator().manual_seed(tc.seed), data.TaskSampler(tc.seed)
    engine = ModelEngine(model, tok)
    log: dict[str, Any] = {"config": asdict(tc), "model": cfg.to_dict(), "tokens_train": len(stream),
                           "tokens_held_out": len(held), "curve": []}
    model.eval()
    log["init_held_out_loss"] = held_out_loss(model, held, tc)
    model.train()
    experts.loads.zero_()  # balance on training tokens only
    run_code = run_task = 0.0
    bar = tqdm(range(1, tc.steps + 1), desc="train", unit="step")
    for step in bar:
        code_loss, code_ce = diffusion_loss(model, *data.code_batch(stream, tc.batch_size, tc.seq_len, gen),
                                            tc.block_length, tc.eps, gen)
        task_loss, task_ce = diffusion_loss(model, *data.task_rows(tok, sampler.sample(tc.task_batch_size),
                                                                   tc.block_length), tc.block_length, tc.eps, gen)
        opt.zero_grad(set_to_none=True)
        (code_loss + task_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
        update_expert_bias(model, experts, tc.bias_rate)
        run_code, run_task = run_code + code_ce.item(), run_task + task_ce.item()
        if step % tc.log_every == 0 or step == tc.steps:
            n = tc.log_every if step % tc.log_every == 0 else step % tc.log_every
            row = {"step": step, "code_ce": run_code / n, "task_ce": run_task / n, "lr": sched.get_last_lr()[0],
                   "elapsed_s": time.perf_counter() - t_start}
            run_code = run_task = 0.0
            if step % tc.eval_every == 0 or step == tc.steps:
                model.eval()
                row["held_out_ce"] = held_out_loss(model, held, tc)
                row["exact_match"] = evaluate_tasks(engine, 40, seed=tc.seed + 1)["exact_match"]
                model.train()
                experts.loads.zero_()
            log["curve"].append(row)
            bar.set_postfix(code=f"{row['code_ce']:.3f}", task=f"{row['task_ce']:.3f}")
            tqdm.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    model.eval()
    log["train_s"] = time.perf_counter() - t_start
    log["final_held_out_loss"] = log["curve"][-1]["held_out_ce"]
    log["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": tc.threads, "python": platform.python_version()}
    export(model, experts, tok, out)
    (out / "metrics.json").write_text(json.dumps(log, indent=2))
    plot_curve(log, out / "loss_curve.png")
    return log


def export(model: LLaDA2Model, experts: TrainableExperts, tok: Any, out: Path) -> None:
    """config.json + bf16 safetensors in the official layout + tokenizer.json/tokenizer_config.json."""
    cfg = model.config
    tensors = [*((n, t.detach()) for n, t in model.state_dict().items()), *experts.tensors(cfg)]
    write_checkpoint(cfg, out, iter(tensors), max_shard_bytes=1 << 30)
    save_tokenizer(tok, out)


def plot_curve(log: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = log["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["code_ce"] for r in rows], label="train code CE (masked)")
    ax.plot([r["step"] for r in rows], [r["task_ce"] for r in rows], label="train task CE (masked)")
    evals = [r for r in rows if "held_out_ce" in r]
    ax.plot([r["step"] for r in evals], [r["held_out_ce"] for r in evals], "o-", label="held-out code CE")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / masked token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finite(value: float, flag: str) -> float:
    if not math.isfinite(value):  # NaN passes click's range checks
        raise click.BadParameter(f"{value!r} is not a finite number", param_hint=flag)
    return value


@click.command("train")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output checkpoint directory.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed for init, data order and masks.")
@click.option("--steps", default=TrainConfig.steps, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", default=TrainConfig.batch_size, show_default=True, help="Code rows per step.")
@click.option("--task-batch-size", default=TrainConfig.task_batch_size, show_default=True,
              help="Generated-task rows (one block each) per step.")
@click.option("--seq-len", default=TrainConfig.seq_len, show_default=True, help="Tokens per code row.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr, show_default=True,
              callback=lambda ctx, p, v: _finite(v, "--lr"), help="Peak AdamW learning rate (cosine to 10%).")
@click.option("--vocab-size", type=click.IntRange(min=300), default=TrainConfig.vocab_size, show_default=True,
              help="BPE vocabulary size (at least 300: the 256 byte tokens, the special tokens and some merges).")
@click.option("--hidden-size", default=TrainConfig.hidden_size, show_default=True, help="Model width.")
@click.option("--layers", default=TrainConfig.num_hidden_layers, show_default=True, help="Layers (first dense).")
@click.option("--experts", default=TrainConfig.num_experts, show_default=True, help="Routed experts per MoE layer.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (whole: no file of the old model stays).")
@click.option("--log-every", default=TrainConfig.log_every, show_default=True, help="Steps between loss lines.")
@click.option("--eval-every", default=TrainConfig.eval_every, show_default=True,
              help="Steps between held-out loss / exact-match evaluations.")
def train_command(out: str, seed: int, steps: int, batch_size: int, task_batch_size: int, seq_len: int, lr: float,
                  vocab_size: int, hidden_size: int, layers: int, experts: int, overwrite: bool, log_every: int,
                  eval_every: int) -> None:
    """Train the built-in LLaDA2.0-architecture MoE diffusion LM from scratch (stdlib code + tasks). The model is
    written into a fresh directory that replaces --out only when complete. Threads: the global `tide --threads`
    (default 2 here: results depend on it)."""
    from tide.hub import model_dir_writer

    ctx = click.get_current_context()
    threads = (ctx.parent.params.get("threads") if ctx.parent else None) or TrainConfig.threads
    try:
        tc = TrainConfig(out=out, seed=seed, steps=steps, batch_size=batch_size, task_batch_size=task_batch_size,
                         seq_len=seq_len, lr=lr, vocab_size=vocab_size, hidden_size=hidden_size,
                         num_hidden_layers=layers, num_experts=experts, threads=threads, log_every=log_every,
                         eval_every=eval_every)
        v = tc.vocab_size  # the model's shape is checked now, not after the tokenizer is trained
        model_config(tc, {"pad_token_id": v - 3, "eos_token_id": v - 2, "mask_token_id": v - 1})
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    with model_dir_writer(out, overwrite) as tmp:
        log = fit(dataclasses.replace(tc, out=str(tmp)))
    click.echo(json.dumps({"out": out, "train_s": round(log["train_s"], 1), "init_held_out_loss":
                           round(log["init_held_out_loss"], 4), "final_held_out_loss":
                           round(log["final_held_out_loss"], 4), "exact_match": log["curve"][-1]["exact_match"]}))


train = train_command  # the name the CLI registers: main.add_command(train)
