"""Block-diffusion decoding with the official LLaDA2.0 `generate` semantics, in two forward regimes.

Owns the canvas, the block loop, the transfer schedule and the commit rule. Knows nothing about experts
or placement: it calls the model, which calls its executor. `regime` is a field of DecodeConfig:
  "full":     every step recomputes prompt + finished blocks + current block (official code, TIDE's code);
  "block-kv": finished blocks live in a KV cache; a step forwards only the current block, and a finished
              block gets one extra "commit" forward that writes its clean K/V. Under the block-causal mask
              both regimes compute the same function, so they commit the same tokens.
Forwards are counted: they are the metric that matters (NFE).
`generate_batch` decodes several requests with the same rules, continuously batched (see its docstring).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tide.config import DecodeConfig
from tide.model import KVCache, LLaDA2Model, Part, block_causal_mask
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
    check_prompt(model, prompt, cfg, mask_id)
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


@dataclass
class Request:
    """One request of a batch: its prompt and its decode settings (gen length, sampling, seed, stop rule)."""

    prompt: list[int]
    cfg: DecodeConfig


@dataclass
class _Live:
    """A request in the batch: its canvas, current block, KV cache, generator and counts."""

    index: int
    prompt_len: int
    x: Tensor
    block: int
    n_blocks: int
    cfg: DecodeConfig
    gen: torch.Generator
    cache: KVCache | None
    out: Generation
    schedule: list[int]
    step: int = 0


def check_prompt(model: LLaDA2Model, prompt: list[int], cfg: DecodeConfig, mask_id: int) -> None:
    """Every prompt is checked where it enters, batched or alone."""
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
    need = -(-(len(prompt) + cfg.gen_length) // cfg.block_length) * cfg.block_length
    if limit is not None and need > limit:
        raise ValueError(f"the prompt ({len(prompt)} tokens) plus --gen-length {cfg.gen_length}, in blocks of "
                         f"--block-length {cfg.block_length}, need {need} positions, beyond the model's "
                         f"max_position_embeddings {limit}: shorten the prompt, the generation or the block")


@torch.no_grad()
def generate_batch(model: LLaDA2Model, requests: list[Request], batch_size: int, mask_id: int,
                   eos_id: int | None) -> list[Generation]:
    """Decode `requests`, up to `batch_size` of them per forward, each exactly as `generate` decodes it alone
    (its canvas, blocks from position 0, schedule, commit rule, generator and stop rule), up to the rounding of
    GEMMs over the batch's rows. Continuous: a request that finishes leaves and the next waiting one joins
    before the next forward. The schedule depends on step counts only, so a run is repeatable.

    Each tick: the joining requests' prompt blocks go into their KV caches (one "prefill" forward, block-kv);
    one "denoise" forward over every live request's current block; the finished blocks' clean K/V (one
    "commit" forward, block-kv). The policies see the batch's clock: denoising forward f of the batch is
    StepInfo(block=f // steps, step=f % steps, requests=live requests), so TIDE refreshes every R forwards of
    the batch and its first `steps` forwards refresh at every step, as a lone request's first block does.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if not requests:
        return []
    L, regime = requests[0].cfg.block_length, requests[0].cfg.regime
    if any(r.cfg.block_length != L or r.cfg.regime != regime for r in requests):
        raise ValueError("every request of a batch needs the same block length and regime")
    for r in requests:
        check_prompt(model, r.prompt, r.cfg, mask_id)
    device = next(model.parameters()).device
    kv = regime == "block-kv"
    window = max(r.cfg.effective_steps for r in requests)
    waiting, live = deque(range(len(requests))), []
    done: list[Generation | None] = [None] * len(requests)
    denoised = 0  # the batch's denoising forwards so far: its clock

    def clock(kind: str, n: int) -> StepInfo:
        return StepInfo(denoised // window, denoised % window, kind=kind, requests=n)

    while waiting or live:
        joining = []
        while waiting and len(live) < batch_size:
            i = waiting.popleft()
            r = requests[i]
            P = len(r.prompt)
            n_blocks = -(-(P + r.cfg.gen_length) // L)
            x = torch.full((n_blocks * L,), mask_id, dtype=torch.long, device=device)
            x[:P] = torch.tensor(r.prompt, dtype=torch.long, device=device)
            lv = _Live(i, P, x, P // L, n_blocks, r.cfg, torch.Generator().manual_seed(r.cfg.seed),
                       model.new_cache() if kv else None, Generation(tokens=[], forwards=0),
                       transfer_schedule(L, r.cfg.effective_steps))
            live.append(lv)
            if kv and lv.block > 0:
                joining.append(lv)
        if joining:  # prompt blocks -> each one's KV cache, block-causal among themselves
            model.forward_packed([Part(lv.x[: lv.block * L], 0, block_causal_mask(lv.block * L, L, device), lv.cache,
                                       True, 1) for lv in joining], clock("prefill", len(joining)))
            for lv in joining:
                lv.out.forwards += 1
        parts = [Part(lv.x[lv.block * L: (lv.block + 1) * L], lv.block * L, None, lv.cache) if kv else
                 Part(lv.x[: (lv.block + 1) * L], 0, block_causal_mask((lv.block + 1) * L, L, device),
                      logits_last=L) for lv in live]
        logits = model.forward_packed(parts, clock("denoise", len(live)))
        denoised += 1
        committing, finished = [], []
        for lv, lg in zip(live, logits, strict=True):
            s, end = lv.block * L, (lv.block + 1) * L
            masked = lv.x[s:end] == mask_id
            x0, p = sample(lg, lv.cfg, lv.gen)
            take = commit(p, masked, lv.schedule[lv.step], lv.cfg.threshold)
            lv.x[s:end] = torch.where(take, x0, lv.x[s:end])
            lv.out.forwards, lv.step = lv.out.forwards + 1, lv.step + 1
            if bool((lv.x[s:end] == mask_id).any()) and lv.step < len(lv.schedule):
                continue  # the block goes on
            lv.out.steps_per_block.append(lv.step)
            stop = lv.cfg.eos_early_stop and eos_id is not None and bool((lv.x[lv.prompt_len:end] == eos_id).any())
            if stop or lv.block + 1 == lv.n_blocks:
                finished.append(lv)
            elif kv:
                committing.append(lv)
            else:
                lv.block, lv.step = lv.block + 1, 0
        if committing:  # the finished blocks' clean K/V, for the blocks after them
            model.forward_packed([Part(lv.x[lv.block * L: (lv.block + 1) * L], lv.block * L, None, lv.cache, True, 1)
                                  for lv in committing], clock("commit", len(committing)))
            for lv in committing:
                lv.out.forwards += 1
                lv.block, lv.step = lv.block + 1, 0
        for lv in finished:
            end = (lv.block + 1) * L
            tokens = lv.x[lv.prompt_len: min(end, lv.prompt_len + lv.cfg.gen_length)].tolist()
            if eos_id is not None and eos_id in tokens:
                tokens = tokens[: tokens.index(eos_id) + 1]
            lv.out.tokens = tokens
            done[lv.index] = lv.out
            live.remove(lv)
    return done  # type: ignore[return-value]
