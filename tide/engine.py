"""Assembly: checkpoint -> model + expert store + policy + executor, and the special token ids.

Owns nothing but the wiring (`load`) and the small Engine record it returns. Policies are looked up by
name in the registry (filled by the `tide.policies` entry points: baselines and tide.refresh).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tide.budget import BudgetSizes, slots_per_layer
from tide.checkpoint import CheckpointReader, fill_store, load_model, load_tokenizer
from tide.config import DTYPES, DecodeConfig, ModelConfig
from tide.decode import Generation, generate
from tide.experts.executor import MoEExecutor
from tide.experts.store import ExpertStore
from tide.model import LLaDA2Model
from tide.policy import PolicyContext, load_registered, make_policy
from tide.trace import RoutingTrace

log = logging.getLogger("tide")

# Official LLaDA2.0 generate() defaults; used only when neither config.json nor the tokenizer has them.
OFFICIAL_EOS_ID, OFFICIAL_MASK_ID, OFFICIAL_VOCAB = 156892, 156895, 157184


@dataclass
class Engine:
    model: LLaDA2Model
    store: ExpertStore
    executor: MoEExecutor  # or a peer's executor with the same call, counters and finish()
    tokenizer: Any
    mask_id: int
    eos_id: int | None
    notes: list[str] = field(default_factory=list)  # what was inferred, said once to the user

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids instead of text")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt: list[int], cfg: DecodeConfig) -> Generation:
        return generate(self.model, prompt, cfg, self.mask_id, self.eos_id)

    def use_policy(self, name: str, popularity: Mapping[int, Mapping[int, int]] | None = None,
                   trace: RoutingTrace | None = None, **options: Any) -> None:
        """Swap the placement policy: reset residency to its warm start and clear the counters.

        A policy class with `from_profile` (tide with refresh_interval="auto") is built from the trace.
        """
        cfg = self.config
        ctx = PolicyContext(cfg.num_experts, tuple(cfg.moe_layers), self.store.slots, popularity)
        builder = getattr(load_registered().get(name), "from_profile", None)
        if builder is not None and trace is not None:
            policy, note = builder(ctx, trace, **options)
            self.notes.append(note)
        else:
            policy = make_policy(name, ctx, **options)
        self.executor.policy = policy
        self.executor.warm_start()
        self.executor.counters.clear()

    def profile(self, prompts: list[list[int]], cfg: DecodeConfig) -> tuple[dict[int, dict[int, int]], RoutingTrace]:
        """Decode `prompts` and return the tokens routed to each expert of each layer, and the routing trace."""
        self.executor.counters.clear()
        trace = self.executor.trace = RoutingTrace(self.config.num_experts, self.config.moe_layers)
        try:
            for prompt in prompts:
                self.generate(prompt, cfg)
        finally:
            self.executor.trace = None
        popularity = {layer: dict(c) for layer, c in self.executor.counters.expert_tokens.items()}
        self.executor.counters.clear()
        return popularity, trace


def torch_dtype(name: str | None, cfg: ModelConfig) -> torch.dtype:
    name = name or cfg.dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose one of {DTYPES}")
    return getattr(torch, name)


def special_ids(cfg: ModelConfig, tokenizer: Any) -> tuple[int, int | None, list[str]]:
    """mask and EOS ids: config.json first, then the tokenizer's special tokens, then the official defaults."""
    notes = []
    mask_id, eos_id = cfg.mask_token_id, cfg.eos_token_id
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.convert_tokens_to_ids("<|mask|>") if "<|mask|>" in tokenizer.get_vocab() else None
        if mask_id is not None:
            notes.append(f"mask id {mask_id} taken from the tokenizer's <|mask|>")
    if eos_id is None and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_id = tokenizer.eos_token_id
        notes.append(f"eos id {eos_id} taken from the tokenizer")
    if mask_id is None and cfg.vocab_size == OFFICIAL_VOCAB:
        mask_id = OFFICIAL_MASK_ID
        notes.append(f"mask id {mask_id}: the official LLaDA2.0 default (config.json has no mask_token_id)")
    if eos_id is None and cfg.vocab_size == OFFICIAL_VOCAB:
        eos_id = OFFICIAL_EOS_ID
        notes.append(f"eos id {eos_id}: the official LLaDA2.0 default (config.json has no eos_token_id)")
    if mask_id is None:
        raise ValueError("no mask token id: set 'mask_token_id' in config.json or give the tokenizer <|mask|>")
    return mask_id, eos_id, notes


def non_expert_bytes(model: LLaDA2Model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# Generic prompts for profiling policies (cpu-fallback); deliberately not the prompts that get measured.
PROFILE_PROMPTS = ("The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
                   "Question: what is 12 plus 30?\nAnswer:")
PROFILE_DECODE = DecodeConfig(gen_length=64, block_length=32, steps=32)


def load(path: str | Path, policy: str = "reference", gpu_budget: str | None = None, device: str = "cpu",
         dtype: str | None = None, cpu_threads: int = 1, staging: int = 2,
         popularity: Mapping[int, Mapping[int, int]] | None = None, profile_prompts: list[list[int]] | None = None,
         **policy_options: Any) -> Engine:
    """Load a checkpoint directory and wire the named policy in. `gpu_budget`: see tide.budget.

    A policy that wants a profile (`wants_profile(options)`: cpu-fallback; tide with refresh_interval="auto")
    and gets no `popularity` is given one: the engine first runs under 'lru' on `profile_prompts` (default:
    PROFILE_PROMPTS, not the prompts that get measured) and records the routing.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    reader = CheckpointReader(path)
    cfg = reader.config
    model = load_model(reader, device, torch_dtype(dtype, cfg))
    dt = next(model.parameters()).dtype
    expert_bytes = cfg.expert_params * torch.empty((), dtype=dt).element_size()
    sizes = BudgetSizes(cfg.num_experts, len(cfg.moe_layers), expert_bytes, non_expert_bytes(model), staging)
    slots = slots_per_layer(gpu_budget, sizes)
    ctx = PolicyContext(cfg.num_experts, tuple(cfg.moe_layers), slots, popularity)
    wants = getattr(load_registered().get(policy), "wants_profile", None)
    profiling = popularity is None and wants is not None and wants(policy_options)
    first = make_policy("lru" if profiling else policy, ctx, **({} if profiling else policy_options))
    store = ExpertStore(cfg, slots, device, dt, staging, device_tier=getattr(first, "device_tier", True))
    fill_store(reader, store)
    if hasattr(first, "build_executor"):  # a peer that brings its own executor (accelerate)
        executor = first.build_executor(store, cpu_threads)
    else:
        executor = MoEExecutor(store, first, cpu_threads)
    executor.warm_start()
    model.set_executor(executor)
    tokenizer = load_tokenizer(path)
    mask_id, eos_id, notes = special_ids(cfg, tokenizer)
    engine = Engine(model, store, executor, tokenizer, mask_id, eos_id, notes)
    if profiling:
        prompts = profile_prompts or [engine.encode(p) if tokenizer else [i % cfg.vocab_size for i in range(16)]
                                      for p in PROFILE_PROMPTS]
        popularity, trace = engine.profile(prompts, PROFILE_DECODE)
        notes.append(f"policy {policy!r}: profiled on {len(prompts)} prompt(s) ({len(trace.records)} layer-forwards)")
        engine.use_policy(policy, popularity, trace, **policy_options)
    for note in notes:
        log.info(note)
    return engine
