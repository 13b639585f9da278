"""Model pieces against independent, naive per-token implementations."""

import pytest
import torch

from tide.config import preset
from tide.model import Router, apply_rope, block_causal_mask, rope_cos_sin


def naive_route(x, weight, bias, cfg):
    """Per-token, plain-Python version of the LLaDA2.0 router (ties: lower index first)."""
    E, G = cfg.num_experts, cfg.n_group
    per = E // G
    ids, ws = [], []
    for row in x:
        scores = [1 / (1 + torch.exp(-torch.dot(row.float(), weight[e].float())).item()) for e in range(E)]
        choice = [scores[e] + bias[e].item() for e in range(E)]
        if G > 1:
            group_score = [sum(sorted(choice[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(G)]
            keep = sorted(range(G), key=lambda g: (-group_score[g], g))[: cfg.topk_group]
            choice = [c if e // per in keep else float("-inf") for e, c in enumerate(choice)]
        top = sorted(range(E), key=lambda e: (-choice[e], e))[: cfg.num_experts_per_tok]
        w = [scores[e] for e in top]
        if cfg.norm_topk_prob:
            s = sum(w) + 1e-20
            w = [v / s for v in w]
        ids.append(top)
        ws.append([v * cfg.routed_scaling_factor for v in w])
    return torch.tensor(ids), torch.tensor(ws, dtype=torch.float64)


@pytest.mark.parametrize("n_group, topk_group, norm", [(4, 2, True), (1, 1, True), (8, 3, False)])
def test_router_matches_naive(n_group, topk_group, norm):
    cfg = preset("tiny", num_experts=32, num_experts_per_tok=4, n_group=n_group, topk_group=topk_group,
                 norm_topk_prob=norm)
    g = torch.Generator().manual_seed(n_group)
    router = Router(cfg)
    router.weight.data = torch.randn(cfg.num_experts, cfg.hidden_size, generator=g)
    router.expert_bias = torch.randn(cfg.num_experts, generator=g) * 0.5  # large: it must change selection
    x = torch.randn(20, cfg.hidden_size, generator=g)
    ids, w = router(x)
    ref_ids, ref_w = naive_route(x, router.weight.data, router.expert_bias, cfg)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    # the bias only selects: weights are unbiased sigmoid scores
    scores = torch.sigmoid(x @ router.weight.data.T)
    picked = scores.gather(1, ids)
    expected = picked / picked.sum(-1, keepdim=True) if norm else picked
    torch.testing.assert_close(w, expected * cfg.routed_scaling_factor)


def test_router_ties_go_to_lower_index():
    cfg = preset("tiny", num_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    router = Router(cfg)  # zero weights: every score is sigmoid(0) = 0.5, all tied
    ids, w = router(torch.randn(3, cfg.hidden_size))
    ref_ids, ref_w = naive_route(torch.zeros(3, cfg.hidden_size), router.weight.data, router.expert_bias, cfg)
    assert ids.tolist() == ref_ids.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(w, torch.full((3, 4), 2.5 / 4))


def test_partial_rope_rotates_only_rotary_dims():
    cos, sin = rope_cos_sin(torch.arange(5), rotary_dim=8, theta=10000.0)
    q = torch.randn(1, 2, 5, 16)
    out = apply_rope(q, cos, sin)
    assert torch.equal(out[..., 8:], q[..., 8:])
    assert torch.equal(out[:, :, 0], q[:, :, 0])  # position 0: identity
    torch.testing.assert_close(out[..., :8].norm(dim=-1), q[..., :8].norm(dim=-1))  # a rotation


def test_block_causal_mask():
    m = block_causal_mask(6, 2)
    assert m.int().tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0],
                                [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
