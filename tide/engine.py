"""Assembly: checkpoint -> model + expert store + policy + executor, and the special token ids.

Owns nothing but the wiring (`load`) and the small Engine record it returns. Policies are looked up by
name in the registry (filled by the `tide.policies` entry points: baselines and tide.refresh).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tide.budget import BudgetSizes, slots_per_layer
from tide.checkpoint import CheckpointReader, fill_store, load_model, load_tokenizer, read_generation_config
from tide.config import DTYPES, PROFILE_DECODE, DecodeConfig, ModelConfig, default_cpu_threads, profile_prompts
from tide.decode import Generation, Request, generate, generate_batch
from tide.device import resolve_device
from tide.experts.executor import DEVICE_KERNELS, MoEExecutor, swiglu
from tide.experts.host_kernels import host_kernel as choose_host_kernel
from tide.experts.masters import PrivateMaster, SharedMaster
from tide.experts.store import DeviceMemoryError, ExpertStore, free_bytes
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
    executor: MoEExecutor | None  # or a peer's executor with the same call, counters and finish()
    tokenizer: Any
    mask_id: int
    eos_id: int | None
    notes: list[str] = field(default_factory=list)  # what was inferred, said once to the user
    cpu_threads: int = 1
    staging: int = 2
    policy_name: str = "reference"
    decode_defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    host_kernel: Callable[[Tensor, Tensor, Tensor], Tensor] = swiglu  # host-tier experts (MoEExecutor)
    device_kernel: str = "swiglu"  # device-tier experts (MoEExecutor): swiglu, or grouped (level c only)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Token ids of `text`; with `chat`, of `text` as one user turn in the tokenizer's chat template."""
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass token ids instead of text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable bytes from the command line arrive as lone surrogates
            raise ValueError(f"the prompt is not valid UTF-8 (an undecodable byte at character {err.start}): give "
                             "UTF-8 text, or token ids") from None
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this checkpoint's tokenizer has no chat template ('chat_template' in "
                                 "tokenizer_config.json, or a chat_template.jinja beside it): drop --chat")
            text = apply_chat_template(self.tokenizer, [{"role": "user", "content": text}])
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt: list[int], cfg: DecodeConfig) -> Generation:
        return generate(self.model, prompt, cfg, self.mask_id, self.eos_id)

    def generate_batch(self, requests: list[Request], batch_size: int) -> list[Generation]:
        return generate_batch(self.model, requests, batch_size, self.mask_id, self.eos_id)

    def run(self, ids: list[int], cfg: DecodeConfig, trace: bool = False) -> dict[str, Any]:
        """One timed generation: tokens, stats (counters, throughput, peak GPU memory) and the optional trace."""
        out = self.run_batch([Request(ids, cfg)], 1, trace)
        return {"tokens": out["tokens"][0], "stats": out["stats"], "trace": out["trace"]}

    def run_batch(self, requests: list[Request], batch_size: int, trace: bool = False) -> dict[str, Any]:
        """Timed generation of `requests`, `batch_size` per forward (1: one at a time through the single-request
        decoder, the paper's setting): each request's tokens, stats over all of them, the optional trace."""
        if self.executor is None:
            raise ValueError("the engine has no policy configured (the last configure failed)")
        if batch_size > 1:
            self.check_batch_fit(requests, batch_size)
        self.executor.counters.clear()
        self.executor.trace = RoutingTrace(self.config.num_experts, self.config.moe_layers) if trace else None
        device = self.store.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        self.executor.timing = True  # device time spans only in timed runs, resolved by finish() below
        try:
            gens = ([self.generate(r.prompt, r.cfg) for r in requests] if batch_size == 1 else
                    self.generate_batch(requests, batch_size))
            counters = self.executor.finish()  # synchronises the device
        finally:
            self.executor.timing = False
        seconds = time.perf_counter() - t0
        totals = counters.totals()
        tokens = sum(len(g.tokens) for g in gens)
        blocks = sum(len(g.steps_per_block) for g in gens)
        stats = {"generated_tokens": tokens, "seconds": seconds,
                 "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "batch_size": batch_size,
                 "requests": len(requests),
                 # the batch's forwards (a forward serves every request in it); per block of one request
                 "forwards": counters.forwards(), "forwards_per_block": sum(g.forwards for g in gens) / max(1, blocks),
                 "steps_per_block": [n for g in gens for n in g.steps_per_block], "slots_per_layer": self.store.slots,
                 "expert_bytes": self.store.expert_bytes, "regime": requests[0].cfg.regime if requests else None,
                 "device": str(self.store.device),
                 "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                 "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else None,
                 **totals, "non_expert_s": seconds - totals["moe_s"],
                 "routed_tokens_per_layer": counters.routed_tokens_per_layer()}
        trace_obj, self.executor.trace = self.executor.trace, None
        return {"tokens": [g.tokens for g in gens], "stats": stats, "trace": trace_obj}

    def budget_sizes(self) -> BudgetSizes:
        return BudgetSizes(self.config.num_experts, len(self.config.moe_layers), self.store.expert_bytes,
                           non_expert_bytes(self.model), self.staging)

    def configure(self, policy: str, gpu_budget: str | None = None,
                  popularity: Mapping[int, Mapping[int, int]] | None = None,
                  profile_prompts: list[list[int]] | None = None, trace: RoutingTrace | None = None,
                  profile_cfg: DecodeConfig | None = None, profile_batch: int = 1, **options: Any) -> None:
        """(Re)build the device tier for `gpu_budget` and wire `policy` in, from its warm start.

        A policy that wants a profile (`wants_profile(options)`: cpu-fallback; tide with refresh_interval="auto")
        and gets no `popularity` is given one: the engine first runs under 'lru' on `profile_prompts` (default:
        PROFILE_PROMPTS, not the prompts that get measured; decoded with `profile_cfg`, default PROFILE_DECODE),
        records the routing, and builds the policy from it (`from_profile` where the class has one), decoding
        `profile_batch` requests per forward as the runs it plans for. Callers that profiled pass `popularity`
        and `trace`.
        """
        cfg = self.config
        slots = slots_per_layer(gpu_budget, self.budget_sizes())
        cls = load_registered().get(policy)
        wants = getattr(cls, "wants_profile", None)
        profiled = wants is not None and wants(options)
        if profiled and popularity is None:
            popularity, trace = self.profile_routing(gpu_budget, profile_prompts, profile_cfg, profile_batch)
        ctx = PolicyContext(cfg.num_experts, tuple(cfg.moe_layers), slots, popularity)
        builder = getattr(cls, "from_profile", None)
        if profiled and builder is not None:
            if trace is None:
                raise ValueError(f"policy {policy!r} with these options needs a routing trace to plan from")
            chosen, note = builder(ctx, trace, **options)
            self.notes.append(note)
        else:
            chosen = make_policy(policy, ctx, **options)
        if device_tier := getattr(chosen, "device_tier", True):
            self.check_fit(slots, gpu_budget)
        if self.executor is not None:
            self.executor.close()
        self.executor = None  # no half-configured engine if resize fails
        gc.collect()  # accelerate's hooks hold cycles: free the previous tier's memory before the next
        if self.store.device.type == "cuda":
            torch.cuda.empty_cache()
        self.store.resize(slots, self.staging, device_tier=device_tier)
        if hasattr(chosen, "build_executor"):  # a peer that brings its own executor (accelerate)
            self.executor = chosen.build_executor(self.store, self.cpu_threads)
        else:
            self.executor = MoEExecutor(self.store, chosen, self.cpu_threads, self.host_kernel, self.device_kernel)
        self.executor.warm_start()
        self.model.set_executor(self.executor)
        self.policy_name = policy

    def close(self) -> None:
        """Stop the workers and unpin the host master (after its copies are done). The engine is unusable after."""
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        self.store.close()

    def request_bytes(self, r: Request) -> int:
        """Device memory one request holds while it is in a batch (an estimate from the shapes): its KV cache
        (block-kv) and its share of a forward's activations, attention scores and fp32 logits."""
        cfg, size = self.config, self.store.dtype.itemsize
        L = r.cfg.block_length
        positions = -(-(len(r.prompt) + r.cfg.gen_length) // L) * L
        kv = r.cfg.regime == "block-kv"
        tokens = L if kv else positions
        cache = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * positions * size if kv else 0
        acts = tokens * (8 * cfg.hidden_size + 3 * cfg.num_experts_per_tok * cfg.hidden_size) * size
        scores = cfg.num_attention_heads * tokens * positions * 4
        return cache + acts + scores + L * cfg.vocab_size * 4

    def largest_batch(self, requests: list[Request], cap: int) -> int:
        """The largest batch size up to `cap` whose largest requests, together, fit in the device's free memory
        now (0: not even one). lm-eval's batch_size=auto."""
        needs = sorted((self.request_bytes(r) for r in requests), reverse=True)[:cap]
        room = free_bytes(self.store.device)
        return max((b for b in range(len(needs) + 1) if sum(needs[:b]) <= room), default=0)

    def check_batch_fit(self, requests: list[Request], batch_size: int) -> None:
        """Refuse a batch whose largest requests, together, would not fit beside what is on the device, naming
        the largest batch size that fits."""
        needs = sorted((self.request_bytes(r) for r in requests), reverse=True)[:batch_size]
        room = free_bytes(self.store.device)
        if sum(needs) > room:
            fits = self.largest_batch(requests, batch_size)
            raise DeviceMemoryError(
                f"batch size {batch_size} needs about {sum(needs) / 1e9:.2f} GB on {self.store.device} for its "
                f"requests' KV caches and activations, where {room / 1e9:.2f} GB is free: the largest batch size "
                f"that fits is {fits}")

    def check_fit(self, slots: int, gpu_budget: str | None) -> None:
        """Refuse a device tier that cannot fit beside what is already on the device, in one sentence."""
        store = self.store
        per_layer = len(store.layers) * store.expert_bytes
        need = slots * per_layer + self.staging * store.expert_bytes
        room = free_bytes(store.device) + store.device_bytes  # the current tier is given back first if needed
        if need > room:
            fits = max(0, (room - self.staging * store.expert_bytes) // per_layer)
            raise DeviceMemoryError(
                f"gpu budget {gpu_budget or 'all'} needs {slots} expert slots per layer: {need / 1e9:.2f} GB on "
                f"{store.device}, where {room / 1e9:.2f} GB is free (non-expert weights already loaded); at most "
                f"{fits}/layer fits")

    def profile_routing(self, gpu_budget: str | None, prompts: list[list[int]] | None = None,
                        cfg: DecodeConfig | None = None, batch_size: int = 1) -> tuple[dict, RoutingTrace]:
        """A profiling pass under 'lru' at this budget (any lossless policy routes the same tokens), `batch_size`
        requests per forward as the run it plans for, on the first max(PROFILE_REQUESTS, batch_size) of the
        distinct PROFILE_PROMPTS (copies of a prompt route alike: they would understate a batch's union)."""
        self.configure("lru", gpu_budget)
        if prompts is None:
            prompts = [self.encode(p) if self.tokenizer else [1 + i, *range(2, 17)]
                       for i, p in enumerate(profile_prompts(batch_size))]
        popularity, trace = self.profile(prompts, cfg or PROFILE_DECODE, batch_size)
        self.notes.append(f"profiled on {len(prompts)} prompt(s), batch size {batch_size}: {len(trace.records)} "
                          "layer-forwards")
        return popularity, trace

    def profile(self, prompts: list[list[int]], cfg: DecodeConfig,
                batch_size: int = 1) -> tuple[dict[int, dict[int, int]], RoutingTrace]:
        """Decode `prompts` (`batch_size` per forward) and return the tokens routed to each expert of each layer,
        and the routing trace."""
        self.executor.counters.clear()
        trace = self.executor.trace = RoutingTrace(self.config.num_experts, self.config.moe_layers)
        try:
            if batch_size == 1:
                for prompt in prompts:
                    self.generate(prompt, cfg)
            else:
                self.generate_batch([Request(p, cfg) for p in prompts], batch_size)
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


def special_ids(cfg: ModelConfig, tokenizer: Any, generation: dict | None = None) -> tuple[int, int | None, list[str]]:
    """mask and EOS ids: config.json, then generation_config.json, then the tokenizer's special tokens, then the
    official defaults."""
    notes = []
    mask_id, eos_id = cfg.mask_token_id, cfg.eos_token_id
    generation = generation or {}
    if mask_id is None and isinstance(generation.get("mask_token_id", generation.get("mask_id")), int):
        mask_id = generation.get("mask_token_id", generation.get("mask_id"))
        notes.append(f"mask id {mask_id} taken from generation_config.json")
    gen_eos = generation.get("eos_token_id")
    gen_eos = gen_eos[0] if isinstance(gen_eos, list) and gen_eos else gen_eos
    if eos_id is None and isinstance(gen_eos, int):
        eos_id = gen_eos
        notes.append(f"eos id {eos_id} taken from generation_config.json")
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


# generation_config.json keys -> DecodeConfig fields (dLLM checkpoints may carry their own decoding defaults)
GENERATION_KEYS = {"max_new_tokens": "gen_length", "gen_length": "gen_length", "block_length": "block_length",
                   "steps": "steps", "threshold": "threshold", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k"}


def decode_defaults(generation: dict, source: str | Path = "generation_config.json") -> dict[str, Any]:
    """The decode settings generation_config.json holds, checked with DecodeConfig's rules (ValueError naming the
    file: a `steps: 0` there would otherwise surface at the first generate, without the file's name)."""
    found = {field_: generation[key] for key, field_ in GENERATION_KEYS.items()
             if isinstance(generation.get(key), int | float) and not isinstance(generation.get(key), bool)}
    try:
        DecodeConfig(**found)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return found


def apply_chat_template(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied (text, not ids); a template that raises, does not parse or trips
    jinja's sandbox is a ValueError saying so (no template code runs outside that sandbox)."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as err:
        raise ValueError(f"the tokenizer's chat template failed ({type(err).__name__}: {err})") from None


def non_expert_bytes(model: LLaDA2Model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_memory(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, gpu_budget: str | None,
                 staging: int, host_master: bool = True) -> None:
    """Refuse, before the first allocation, a load that cannot fit: the host master of the routed experts in host
    memory (unless another rank of this machine allocates it: host_master=False); the non-expert weights and the
    expert tier for `gpu_budget` on the device (on a CPU, all three in host memory). One sentence names it all."""
    with torch.device("meta"):
        non_expert = sum(p.numel() for p in LLaDA2Model(cfg).parameters()) * dtype.itemsize
    expert_bytes = cfg.expert_params * dtype.itemsize
    layers = len(cfg.moe_layers)
    slots = slots_per_layer(gpu_budget, BudgetSizes(cfg.num_experts, layers, expert_bytes, non_expert, staging))
    tier = f"the expert tier ({slots}/layer and {staging} staging)"
    parts = {"the host master of the routed experts": (torch.device("cpu"),
                                                       layers * cfg.num_experts * expert_bytes * host_master),
             f"the non-expert weights (embeddings of vocab_size {cfg.vocab_size} x hidden_size {cfg.hidden_size}, "
             "attention, dense and shared MLPs)": (device, non_expert),
             tier: (device, (slots * layers + staging) * expert_bytes)}
    for where in {d for d, _ in parts.values()}:
        need = sum(n for d, n in parts.values() if d == where)
        free = free_bytes(where)
        if need > free:
            listed = ", ".join(f"{name} {n / 1e9:.2f} GB" for name, (d, n) in parts.items() if d == where)
            place = "host memory" if where.type == "cpu" else str(where)
            raise DeviceMemoryError(f"{need / 1e9:.2f} GB of {place} is needed ({listed}); {free / 1e9:.2f} GB is "
                                    f"{'available' if where.type == 'cpu' else 'free there'}: nothing was loaded")


def load(path: str | Path, policy: str = "reference", gpu_budget: str | None = None, device: str = "cpu",
         dtype: str | None = None, cpu_threads: int | None = None, staging: int = 2,
         popularity: Mapping[int, Mapping[int, int]] | None = None, profile_prompts: list[list[int]] | None = None,
         check_finite: bool = True, host_kernel: str = "auto", device_kernel: str = "swiglu", profile_batch: int = 1,
         host_master: PrivateMaster | SharedMaster | None = None, **policy_options: Any) -> Engine:
    """Load a checkpoint directory and wire the named policy in (see Engine.configure; budgets: tide.budget).
    Everything that can be refused is checked first: device, config, tokenizer, memory for the weights and the
    expert tier (`check_memory`), before anything is allocated.
    `host_kernel`: how host-tier experts are computed (tide.experts.host_kernels: auto, torch, amx-bf16, ...);
    `device_kernel`: how device-tier experts are (tide.experts.executor: swiglu, or grouped, held to level c);
    `host_master`: where the host master lives (tide.experts.masters; default: this process's memory)."""
    if device_kernel not in DEVICE_KERNELS:
        raise ValueError(f"device_kernel {device_kernel!r}: choose one of {', '.join(DEVICE_KERNELS)}")
    dev = resolve_device(device)  # "cuda" -> "cuda:<current>": everything below sees an indexed device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # events, streams and memory stats follow the engine's GPU
    cpu_threads = default_cpu_threads() if cpu_threads is None else cpu_threads
    if cpu_threads < 1:
        raise ValueError(f"cpu_threads must be >= 1, got {cpu_threads}")
    reader = CheckpointReader(path, check_finite)
    reader.check_no_unused()
    cfg, tokenizer = reader.config, load_tokenizer(path, reader.config.vocab_size)
    generation = read_generation_config(path)
    defaults = decode_defaults(generation, Path(path) / "generation_config.json")  # checked before anything loads
    dt = torch_dtype(dtype, cfg)
    kernel, kernel_note = choose_host_kernel(host_kernel, dt, cfg.hidden_size, cfg.moe_intermediate_size)
    check_memory(cfg, dt, dev, gpu_budget, staging, host_master=host_master is None or host_master.fills)
    model = load_model(reader, dev, dt)
    store = ExpertStore(cfg, 1, dev, dt, staging, device_tier=False, master=host_master)
    fill_store(reader, store)
    mask_id, eos_id, notes = special_ids(cfg, tokenizer, generation)
    notes.append(f"host kernel: {kernel_note}")
    engine = Engine(model, store, None, tokenizer, mask_id, eos_id, notes, cpu_threads, staging,
                    decode_defaults=defaults, host_kernel=kernel, device_kernel=device_kernel)
    engine.configure(policy, gpu_budget, popularity, profile_prompts, profile_batch=profile_batch, **policy_options)
    for note in notes:
        log.info(note)
    return engine
