"""Configuration dataclasses: the model (HF `config.json` field names), the decoder, and presets.

Owns parsing and validation of configuration. Knows nothing about tensors or files beyond config.json.
Every error names the offending field, so a bad checkpoint fails with a sentence, not a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "llada2_moe"
DTYPES = ("float32", "bfloat16", "float16")
REGIMES = ("block-kv", "full")
HOST_KERNELS = ("auto", "torch", "amx-bf16", "avx512", "avx512-bf16", "avx2")  # tide.experts.host_kernels


@dataclass(frozen=True)
class ModelConfig:
    """LLaDA2.0 MoE hyper-parameters under the official `configuration_llada2_moe.py` names."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP of layers < first_k_dense_replace
    moe_intermediate_size: int  # one routed expert
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    first_k_dense_replace: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    score_function: str = "sigmoid"
    norm_topk_prob: bool = True
    moe_router_enable_expert_bias: bool = True
    router_dtype: str = "fp32"
    use_qk_norm: bool = True
    use_qkv_bias: bool = False
    use_bias: bool = False
    partial_rotary_factor: float = 0.5
    rope_theta: float = 600000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_id: int | None = None  # ours carry it; official configs fall back to DecodeConfig defaults
    mask_token_id: int | None = None
    dtype: str = "bfloat16"  # HF writes `dtype` (transformers >= 4.56) or `torch_dtype` (older)
    model_type: str = MODEL_TYPE
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other keys, kept for round trips

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layers(self) -> list[int]:
        return list(range(self.first_k_dense_replace, self.num_hidden_layers))

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert: gate, up [moe_inter, hidden] and down [hidden, moe_inter]."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    # ---- (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        raw = dict(raw)
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{source}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        if "dtype" not in raw and "torch_dtype" in raw:
            raw["dtype"] = raw.pop("torch_dtype")
        if raw.get("head_dim") is None and raw.get("hidden_size") and raw.get("num_attention_heads"):
            raw["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        if raw.get("eos_token_id") is not None and isinstance(raw["eos_token_id"], list):
            raw["eos_token_id"] = raw["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name != "extra"]
        for name in required:
            if known.get(name) is None:
                raise ValueError(f"{source}: required field {name!r} is missing")
        try:
            return cls(**known, extra=extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of model fields, got a JSON {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **out}

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _validate(c: ModelConfig) -> None:
    positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                "n_group", "topk_group", "max_position_embeddings"]
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"field {name!r} must be a positive integer, got {value!r}")
    for name in ("num_shared_experts", "first_k_dense_replace"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"field {name!r} must be a non-negative integer, got {value!r}")
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise ValueError(f"field 'first_k_dense_replace' ({c.first_k_dense_replace}) exceeds num_hidden_layers")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ValueError("field 'num_attention_heads' must be a multiple of 'num_key_value_heads'")
    if c.num_experts % c.n_group:
        raise ValueError(f"field 'n_group' ({c.n_group}) must divide num_experts ({c.num_experts})")
    if c.topk_group > c.n_group:
        raise ValueError(f"field 'topk_group' ({c.topk_group}) exceeds n_group ({c.n_group})")
    per_group = c.num_experts // c.n_group
    if c.num_experts_per_tok > c.topk_group * per_group:
        raise ValueError(f"field 'num_experts_per_tok' ({c.num_experts_per_tok}) exceeds the experts in "
                         f"topk_group groups ({c.topk_group * per_group})")
    if c.n_group > 1 and per_group < 2:
        raise ValueError("field 'n_group': each group needs at least 2 experts (group score = sum of top-2)")
    if c.score_function != "sigmoid":
        raise ValueError(f"field 'score_function' is {c.score_function!r}; LLaDA2.0 uses 'sigmoid' only")
    if c.router_dtype not in ("fp32", "float32"):
        raise ValueError(f"field 'router_dtype' is {c.router_dtype!r}; only 'fp32' is supported")
    if c.rope_scaling is not None:
        raise ValueError(f"field 'rope_scaling' is {c.rope_scaling!r}; only null (plain RoPE) is supported")
    if c.use_qkv_bias or c.use_bias:
        raise ValueError("fields 'use_qkv_bias'/'use_bias' must be false (LLaDA2.0 has no linear biases)")
    if not 0.0 < c.partial_rotary_factor <= 1.0 or c.rotary_dim % 2:
        raise ValueError(f"field 'partial_rotary_factor' ({c.partial_rotary_factor}) must give an even rotary dim")
    for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "partial_rotary_factor"):
        value = getattr(c, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"field {name!r} must be a finite positive number, got {value!r}")
    if c.dtype not in DTYPES:
        raise ValueError(f"field 'dtype' is {c.dtype!r}; expected one of {DTYPES}")
    for name in ("norm_topk_prob", "moe_router_enable_expert_bias", "use_qk_norm", "use_qkv_bias", "use_bias",
                 "tie_word_embeddings"):
        if not isinstance(getattr(c, name), bool):  # "no" or "false" in quotes would read as true
            raise ValueError(f"field {name!r} must be true or false (a JSON boolean), got {getattr(c, name)!r}")
    for name in ("pad_token_id", "eos_token_id", "mask_token_id"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"field {name!r} must be an integer token id, got {value!r}")
        if value is not None and not 0 <= value < c.vocab_size:
            raise ValueError(f"field {name!r} ({value}) is outside the vocabulary (vocab_size {c.vocab_size})")
    if c.mask_token_id is not None and c.mask_token_id in (c.eos_token_id, c.pad_token_id):
        raise ValueError(f"field 'mask_token_id' ({c.mask_token_id}) equals the EOS or pad id: a committed token "
                         "could never be told from a masked one")


# Official numbers: LLaDA2.0-mini config.json; LLaDA2.0-flash from dFactory's llada2_flash config.
_COMMON = dict(
    model_type=MODEL_TYPE, num_shared_experts=1, first_k_dense_replace=1, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, score_function="sigmoid", norm_topk_prob=True, moe_router_enable_expert_bias=True,
    router_dtype="fp32", use_qk_norm=True, partial_rotary_factor=0.5, rope_theta=600000.0, rms_norm_eps=1e-6,
    max_position_embeddings=32768, tie_word_embeddings=False, use_qkv_bias=False, use_bias=False,
    dtype="bfloat16", num_experts=256, num_experts_per_tok=8, num_key_value_heads=4, head_dim=128,
    vocab_size=157184, pad_token_id=156892, eos_token_id=156892, mask_token_id=156895,
)
PRESETS: dict[str, dict[str, Any]] = {
    "mini": dict(_COMMON, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16, intermediate_size=5120,
                 moe_intermediate_size=512),
    "flash": dict(_COMMON, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=9216,
                  moe_intermediate_size=1024),
    # tiny: the LLaDA2 structure at test scale; vocabulary = 256 bytes + <|pad|>, <|eos|>, <|mask|>, spare.
    "tiny": dict(_COMMON, vocab_size=260, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
                 num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, max_position_embeddings=4096,
                 pad_token_id=256, eos_token_id=257, mask_token_id=258, rope_theta=10000.0, dtype="float32"),
}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_cpu_threads() -> int:
    """Host-tier expert workers by default: half the usable cores, at least one (README, "Threads")."""
    return max(1, usable_cores() // 2)


def default_threads() -> int:
    """The main thread's intra-op threads by default: the usable cores the workers leave, at least one."""
    return max(1, usable_cores() - default_cpu_threads())


def parse_refresh_interval(value: str | int) -> int | str:
    """TIDE's R as a user gives it: 'auto' (the planner chooses) or a positive integer."""
    if value == "auto":
        return "auto"
    try:
        interval = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--refresh-interval {value!r}: expected a positive integer or 'auto'") from None
    if interval < 1:
        raise ValueError(f"--refresh-interval must be >= 1, got {interval}")
    return interval


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, source=f"preset {name!r}")


@dataclass(frozen=True)
class DecodeConfig:
    """Block-diffusion decoding, with the official LLaDA2.0 `generate` defaults."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 32  # denoising steps per block at most
    threshold: float = 0.95
    minimal_topk: int = 1
    temperature: float = 0.0  # 0 = argmax (dInfer/SGLang semantics; see shared/design/llada2.md)
    top_k: int | None = None
    top_p: float | None = None
    regime: str = "block-kv"  # "block-kv": finished blocks in a KV cache; "full": recompute the prefix
    eos_early_stop: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("gen_length", "block_length", "steps", "minimal_topk"):
            if getattr(self, name) <= 0:
                raise ValueError(f"decode field {name!r} must be positive, got {getattr(self, name)}")
        if self.regime not in REGIMES:
            raise ValueError(f"decode field 'regime' is {self.regime!r}; expected one of {REGIMES}")
        if not 0.0 <= self.threshold <= 1.0:  # false for NaN too
            raise ValueError(f"decode field 'threshold' must be in [0, 1], got {self.threshold}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"decode field 'temperature' must be a finite number >= 0, got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"decode field 'top_p' must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"decode field 'top_k' must be positive, got {self.top_k}")

    @property
    def effective_steps(self) -> int:
        """Official rule: steps = min(steps, gen_length // minimal_topk)."""
        return max(1, min(self.steps, self.gen_length // self.minimal_topk))


# The routing profile TIDE plans from (and cpu-fallback ranks by): never the prompts that get measured.
PROFILE_PROMPTS = ("The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
                   "Question: what is 12 plus 30?\nAnswer:", "import json\n\ndef load(path):",
                   "Write a function that reverses a string.", "for i in range(10):\n    print(i * i)",
                   "Question: what is the capital of France?\nAnswer:", "class Point:\n    def __init__(self, x, y):",
                   "The weather today is", "def is_prime(n):", "Translate to French: good morning",
                   "SELECT name FROM users WHERE", "Once upon a time, in a small village,",
                   "def merge_sort(items):", "Question: what is 7 times 8?\nAnswer:",
                   "# Compute the mean of a list of numbers\n")
PROFILE_REQUESTS = 3  # prompts profiled one at a time (the paper's setting); a batch profile takes one per request
PROFILE_DECODE = DecodeConfig(gen_length=64, block_length=32, steps=32)


def profile_prompts(batch_size: int = 1) -> tuple[str, ...]:
    """The prompts a profile at `batch_size` decodes: PROFILE_REQUESTS, or one distinct prompt per request (all 16
    beyond 16: the profile's batch then holds 16, and its note says so)."""
    return PROFILE_PROMPTS[: max(PROFILE_REQUESTS, batch_size)]
