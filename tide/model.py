"""LLaDA2.0 MoE in one plain-torch file: norms, partial RoPE, attention, router, MLPs, the model.

Owns the non-expert weights and the forward math. Owns no routed experts: a MoE layer routes its tokens
and hands (tokens, expert ids, weights) to an executor given to it with `set_executor` (offload is
applied to a built model, not threaded through it). Knows nothing about decoding, files or placement.
Facts follow the official `modeling_llada2_moe.py` (see shared/design/llada2.md).

Shape legend: B batch, T tokens in this forward, S keys (cache + T), H hidden_size, N = B*T,
k = num_experts_per_tok, E = num_experts, h / g query / key-value heads, d head_dim, V vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tide.config import ModelConfig
from tide.policy import StepInfo


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics, cast back, then scale: the official order (matters for bf16 bit-exactness).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: Tensor, rotary_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin [T, rotary_dim] for absolute positions [T]; frequencies over rotary_dim only (partial RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=positions.device)
                                / rotary_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, rotary_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, rotary_dim]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, heads, T, d]: rotate the first rotary_dim dims (rotate_half within them); pass the rest."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    rot = rot * cos.to(x.dtype) + rotated * sin.to(x.dtype)
    return torch.cat((rot, rest), dim=-1)


def block_causal_mask(n_tokens: int, block_length: int, device: torch.device | str = "cpu") -> Tensor:
    """[T, T] bool, True = may attend: block i sees blocks <= i, everything inside its own block."""
    block = torch.arange(n_tokens, device=device) // block_length
    return block[:, None] >= block[None, :]


@dataclass
class KVCache:
    """Keys/values of finished blocks, per layer [B, g, S, d]. Exact under a block-causal mask."""

    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.keys or self.keys[0] is None else self.keys[0].shape[2]


@dataclass
class Segment:
    """One request's tokens within a packed forward: attention runs per segment (its positions, mask and cache);
    everything token-wise (norms, projections, router, experts, MLPs) runs once over the packed tokens."""

    tokens: int
    cos: Tensor
    sin: Tensor
    mask: Tensor | None  # [T, S] bool, True = may attend; None = all S keys
    cache: KVCache | None
    write_cache: bool


@dataclass
class Part:
    """One request's input to `LLaDA2Model.forward_packed`: ids [T] at positions start_pos.. (as `forward`)."""

    ids: Tensor
    start_pos: int = 0
    mask: Tensor | None = None
    cache: KVCache | None = None
    write_cache: bool = False
    logits_last: int | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.h, self.g, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_idx = layer_idx
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.h + 2 * self.g) * self.d, bias=False)
        self.dense = nn.Linear(self.h * self.d, cfg.hidden_size, bias=False)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.d, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, segments: list[Segment]) -> Tensor:
        B, N, _ = x.shape
        qkv = self.query_key_value(x).view(B, N, self.h + 2 * self.g, self.d)
        outs, start = [], 0
        for seg in segments:  # one request's tokens: its own positions, mask and KV cache
            T = seg.tokens
            q, k, v = qkv[:, start:start + T].split([self.h, self.g, self.g], dim=2)
            start += T
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, d]
            if self.use_qk_norm:
                q, k = self.query_layernorm(q), self.key_layernorm(k)
            q, k = apply_rope(q, seg.cos, seg.sin), apply_rope(k, seg.cos, seg.sin)
            if seg.cache is not None:
                past_k, past_v = seg.cache.keys[self.layer_idx], seg.cache.values[self.layer_idx]
                if past_k is not None:
                    k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)  # [B, g, S, d]
                if seg.write_cache:
                    seg.cache.keys[self.layer_idx], seg.cache.values[self.layer_idx] = k, v
            rep = self.h // self.g
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # GQA -> [B, h, S, d]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask)  # scale d^-0.5, not causal
            outs.append(out.transpose(1, 2).reshape(B, T, self.h * self.d))
        return self.dense(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest along the last dim; ties go to the lower index on every device."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


class Router(nn.Module):
    """Sigmoid scores, `expert_bias` for selection only, group-limited top-k, normalised scaled weights."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        # The bias steers selection (aux-loss-free balancing); it never enters the weights. fp32 as released.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        self.k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, H] -> expert ids [N, k] (int64), weights [N, k] (fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # router_dtype fp32, as the official gate
        scores = logits.sigmoid()  # [N, E]
        choice = scores + self.expert_bias
        if self.n_group > 1:
            N, E = choice.shape
            grouped = choice.view(N, self.n_group, E // self.n_group)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # [N, n_group]: sum of each group's top-2
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, _top(group_score, self.topk_group),
                                                                           True)
            choice = grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)
        ids = _top(choice, self.k)  # [N, k]
        weights = scores.gather(1, ids)  # unbiased scores of the chosen experts
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale


class ExpertExecutor(Protocol):
    def __call__(self, layer: int, x: Tensor, ids: Tensor, weights: Tensor, at: StepInfo) -> Tensor:
        """x [N, H], ids [N, k], weights [N, k] fp32 -> sum_k weights * expert_k(x), [N, H] in x's dtype."""
        ...


class MoE(nn.Module):
    """Routes tokens and delegates the routed experts to the executor; computes the shared expert."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.gate = Router(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts else None)
        self.executor: ExpertExecutor | None = None

    def forward(self, x: Tensor, at: StepInfo) -> Tensor:
        if self.executor is None:
            raise RuntimeError("MoE layer has no expert executor: load models with tide.checkpoint.load_model")
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        ids, weights = self.gate(flat)
        out = self.executor(self.layer_idx, flat, ids, weights, at)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(B, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        is_moe = layer_idx >= cfg.first_k_dense_replace
        self.mlp = MoE(cfg, layer_idx) if is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor, segments: list[Segment], at: StepInfo) -> Tensor:
        x = x + self.attention(self.input_layernorm(x), segments)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, at) if isinstance(self.mlp, MoE) else self.mlp(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2Model(nn.Module):
    """Parameter names equal the official checkpoint's (`model.layers.N...`, `lm_head.weight`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def set_executor(self, executor: ExpertExecutor) -> None:
        """Give every MoE layer the object that computes its routed experts (offload = this one call)."""
        for moe in self.moe_layers():
            moe.executor = executor

    def new_cache(self) -> KVCache:
        n = self.config.num_hidden_layers
        return KVCache([None] * n, [None] * n)

    def forward(self, input_ids: Tensor, start_pos: int = 0, mask: Tensor | None = None,
                cache: KVCache | None = None, write_cache: bool = False, at: StepInfo | None = None,
                logits_last: int | None = None) -> Tensor:
        """input_ids [B, T] at positions start_pos.. ; mask [T, S] bool (None = attend to all S keys).

        With a cache, keys are cache + these T tokens; write_cache appends them. Returns logits
        [B, T', V] in fp32 for the last `logits_last` tokens (all when None).
        """
        at = at or StepInfo(block=0, step=0)
        T = input_ids.shape[1]
        positions = torch.arange(start_pos, start_pos + T, device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)
        x = self.model.word_embeddings(input_ids)
        segments = [Segment(T, cos, sin, mask, cache, write_cache)]
        for layer in self.model.layers:
            x = layer(x, segments, at)
        if logits_last is not None:
            x = x[:, -logits_last:]
        return self.lm_head(self.model.norm(x)).float()

    def forward_packed(self, parts: list[Part], at: StepInfo) -> list[Tensor]:
        """Several requests in one forward (a batch): their tokens packed into one sequence, attention per
        request, every MoE layer routing all of them at once. Returns each part's logits [T', V] in fp32, as
        `forward` would for it alone (up to the rounding of GEMMs over more rows)."""
        ids = torch.cat([p.ids for p in parts])[None]  # [1, N]
        segments, keep, start = [], [], 0
        for p in parts:
            T = p.ids.shape[0]
            positions = torch.arange(p.start_pos, p.start_pos + T, device=ids.device)
            cos, sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta)
            segments.append(Segment(T, cos, sin, p.mask, p.cache, p.write_cache))
            last = T if p.logits_last is None else p.logits_last
            keep.append(torch.arange(start + T - last, start + T, device=ids.device))
            start += T
        x = self.model.word_embeddings(ids)
        for layer in self.model.layers:
            x = layer(x, segments, at)
        picked = torch.cat(keep)
        logits = self.lm_head(self.model.norm(x[0, picked])).float()
        return list(logits.split([len(k) for k in keep]))
