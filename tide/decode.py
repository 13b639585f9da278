"""Block-diffusion decoding with the official LLaDA2.0 `generate` semantics, in two forward regimes.

Owns the canvas, the block loop, the transfer schedule and the commit rule. Knows nothing about experts
or placement: it calls the model, which calls its executor. `regime` is a field of DecodeConfig:
  "full":     every step recomputes prompt + finished blocks + current block (official code, TIDE's code);
  "block-kv": finished blocks live in a KV cache; a step forwards only the current block, and a finished
              block gets one extra "commit" forward that writes its clean K/V. Under the block-causal mask
              both regimes compute the same function, so they commit the same tokens.
Forwards are counted: they are the metric that matters (NFE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tide.config import DecodeConfig
from tide.model import LLaDA2Model, block_causal_mask
from tide.policy import StepInfo


@dataclass
class Generation:
    tokens: list[int]  # generated ids, up to and including the first EOS
    forwards: int  # model forward passes (denoising + prefill + commit)
    steps_per_block: list[int] = field(default_factory=list)  # denoising forwards of each generated block


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens to commit at each step: block_length spread evenly, the remainder on the first steps."""
    base, rem = divmod(block_length, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def commit(confidence: Tensor, masked: Tensor, n_min: int, threshold: float) -> Tensor:
    """Which masked positions to unmask this step, [T] bool.

    All masked positions with confidence > threshold, if there are at least n_min (capped at the number
    still masked) of them; otherwise the n_min most confident masked positions (ties: lower position).
    """
    conf = torch.where(masked, confidence, torch.full_like(confidence, float("-inf")))
    n = min(n_min, int(masked.sum()))
    high = (conf > threshold) & masked
    if int(high.sum()) >= n:
        return high
    top = torch.sort(conf, descending=True, stable=True).indices[:n]
    return torch.zeros_like(masked).index_fill_(0, top, True)


def sample(logits: Tensor, cfg: DecodeConfig, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """logits [T, V] -> (tokens [T], their probability [T]) in fp32. Temperature 0 is argmax. Non-finite logits
    (finite weights too large for the dtype overflow in the forward) are a ValueError, not tokens."""
    dtype, logits = logits.dtype, logits.float()
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the forward produced non-finite logits (inf or NaN): weights or activations overflow "
                         f"{str(dtype).removeprefix('torch.')} in this checkpoint; no tokens were made up")
    if cfg.temperature == 0:
        x0 = logits.argmax(-1)
        return x0, F.softmax(logits, dim=-1).gather(-1, x0[:, None])[:, 0]
    logits = logits / cfg.temperature
    if cfg.top_k is not None:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = F.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - F.softmax(sorted_logits, dim=-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    x0 = torch.multinomial(probs.cpu(), 1, generator=gen)[:, 0].to(logits.device)
    return x0, probs.gather(-1, x0[:, None])[:, 0]


@torch.no_grad()
def generate(model: LLaDA2Model, prompt: list[int], cfg: DecodeConfig, mask_id: int, eos_id: int | None) -> Generation:
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    bad = [t for t in prompt if vocab is not None and not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids outside the vocabulary [0, {vocab}): {bad}")
    if mask_id in prompt:  # the decoder would treat it as a position to fill
        raise ValueError(f"the prompt holds the mask token id {mask_id} at position {prompt.index(mask_id)}: a "
                         "prompt is given text, never a masked position")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and -(-(len(prompt) + cfg.gen_length) // cfg.block_length) * cfg.block_length > limit:
        raise ValueError(f"the prompt ({len(prompt)} tokens) plus --gen-length {cfg.gen_length}, in blocks of "
                         f"--block-length {cfg.block_length}, need "
                         f"{-(-(len(prompt) + cfg.gen_length) // cfg.block_length) * cfg.block_length} positions, "
                         f"beyond the model's max_position_embeddings {limit}: shorten the prompt, the generation "
                         "or the block")
    device = next(model.parameters()).device
    P, L = len(prompt), cfg.block_length
    n_blocks = -(-(P + cfg.gen_length) // L)
    x = torch.full((n_blocks * L,), mask_id, dtype=torch.long, device=device)
    x[:P] = torch.tensor(prompt, dtype=torch.long, device=device)
    schedule = transfer_schedule(L, cfg.effective_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    kv = cfg.regime == "block-kv"
    cache = model.new_cache() if kv else None
    first = P // L  # the block holding the prompt's end (or the first empty one)
    out = Generation(tokens=[], forwards=0)
    if kv and first > 0:  # prompt blocks -> KV cache, block-causal among themselves
        model(x[None, : first * L], 0, block_causal_mask(first * L, L, device), cache, True,
              StepInfo(first - 1, 0, kind="prefill"), logits_last=1)
        out.forwards += 1
    end = first * L
    for b in range(first, n_blocks):
        s, end = b * L, (b + 1) * L
        steps = 0
        for step, n_min in enumerate(schedule):
            masked = x[s:end] == mask_id
            if not masked.any():
                break
            at = StepInfo(b, step)
            if kv:
                logits = model(x[None, s:end], s, None, cache, False, at)
            else:
                logits = model(x[None, :end], 0, block_causal_mask(end, L, device), None, False, at, logits_last=L)
            x0, p = sample(logits[0], cfg, gen)
            take = commit(p, masked, n_min, cfg.threshold)
            x[s:end] = torch.where(take, x0, x[s:end])
            out.forwards, steps = out.forwards + 1, steps + 1
        out.steps_per_block.append(steps)
        if cfg.eos_early_stop and eos_id is not None and bool((x[P:end] == eos_id).any()):
            break
        if kv and b + 1 < n_blocks:  # the finished block's clean K/V, for the blocks after it
            model(x[None, s:end], s, None, cache, True, StepInfo(b, steps, kind="commit"), logits_last=1)
            out.forwards += 1
    tokens = x[P: min(end, P + cfg.gen_length)].tolist()
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
    out.tokens = tokens
    return out
