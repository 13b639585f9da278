"""The decoder: schedule, commit rule, EOS, and full == block-kv on a real (tiny, random) model."""

import pytest
import torch
from torch import nn

from tide.config import DecodeConfig
from tide.decode import commit, generate, sample, transfer_schedule
from tide.engine import load

MASK, EOS, V = 9, 8, 12


class ScriptedModel(nn.Module):
    """Logits source: position p prefers token (p % 7) with probability conf(p); EOS at `eos_at`."""

    def __init__(self, eos_at=None, conf=lambda p: 0.99):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.eos_at, self.conf, self.calls = eos_at, conf, []

    def new_cache(self):
        return object()

    def forward(self, ids, start_pos=0, mask=None, cache=None, write_cache=False, at=None, logits_last=None):
        self.calls.append((at.kind, at.block, at.step, ids.shape[1]))
        T = ids.shape[1] if logits_last is None else logits_last
        first = start_pos + ids.shape[1] - T
        logits = torch.full((1, T, V), -30.0)
        for i in range(T):
            p = first + i
            tok = EOS if p == self.eos_at else p % 7
            c = self.conf(p)
            logits[0, i, tok] = torch.log(torch.tensor(c / (1 - c) * (V - 1)))
            logits[0, i, :] = torch.where(torch.arange(V) == tok, logits[0, i, :], torch.zeros(V))
        return logits


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    assert sum(transfer_schedule(32, 7)) == 32
    assert transfer_schedule(4, 8) == [1, 1, 1, 1, 0, 0, 0, 0]


def test_commit_threshold_and_minimum():
    conf = torch.tensor([0.99, 0.5, 0.97, 0.2, 0.999])
    masked = torch.tensor([True, True, True, True, False])
    assert commit(conf, masked, 1, 0.95).tolist() == [True, False, True, False, False]  # all above threshold
    assert commit(conf, masked, 3, 0.95).tolist() == [True, True, True, False, False]  # too few: top-3
    assert commit(conf, masked, 9, 0.95).tolist() == [True, True, True, True, False]  # capped at masked
    tie = torch.tensor([0.5, 0.5, 0.5])
    assert commit(tie, torch.tensor([True, True, True]), 2, 0.9).tolist() == [True, True, False]


def test_sample_greedy_confidence_is_softmax_probability():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    x0, p = sample(logits, DecodeConfig(), None)
    assert x0.tolist() == [1]
    torch.testing.assert_close(p, torch.softmax(logits, -1)[:, 1])


def test_sample_top_k_top_p_are_seeded():
    logits = torch.randn(6, 50)
    cfg = DecodeConfig(temperature=0.8, top_k=5, top_p=0.9)
    a = sample(logits, cfg, torch.Generator().manual_seed(3))
    b = sample(logits, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    top5 = logits.topk(5, dim=-1).indices
    assert all(t in row for t, row in zip(a[0].tolist(), top5.tolist(), strict=True))


@pytest.mark.parametrize("regime", ["full", "block-kv"])
def test_confident_model_takes_one_step_per_block_and_stops_at_eos(regime):
    model = ScriptedModel(eos_at=13)
    cfg = DecodeConfig(gen_length=32, block_length=4, steps=4, threshold=0.95, regime=regime)
    out = generate(model, [1, 2, 3, 4, 5], cfg, MASK, EOS)
    assert out.tokens == [5 % 7, 6, 0, 1, 2, 3, 4, 5, EOS]  # positions 5..13, cut after the EOS
    assert out.steps_per_block == [1, 1, 1]  # blocks 1..3, all confident: one forward each
    kv_extra = 1 + 2 if regime == "block-kv" else 0  # prefill + commits of blocks 1 and 2
    assert out.forwards == 3 + kv_extra
    if regime == "block-kv":
        assert [c[0] for c in model.calls] == ["prefill", "denoise", "commit", "denoise", "commit", "denoise"]
        assert all(c[3] == 4 for c in model.calls if c[0] == "denoise")  # only the current block


def test_unconfident_model_follows_the_schedule():
    model = ScriptedModel(conf=lambda p: 0.5)
    cfg = DecodeConfig(gen_length=8, block_length=8, steps=4, threshold=0.95, regime="full")
    out = generate(model, [1], cfg, MASK, None)
    assert out.steps_per_block == [4, 4]  # prompt tail in block 0 (7 masks), then block 1
    assert len(out.tokens) == 8


@pytest.mark.parametrize("prompt_len", [1, 7, 16, 23, 32, 33])
def test_full_and_block_kv_give_identical_tokens(tiny_dir, prompt_len):
    engine = load(tiny_dir)
    prompt = [(i * 37 + 11) % 256 for i in range(prompt_len)]
    runs = {}
    for regime in ("full", "block-kv"):
        cfg = DecodeConfig(gen_length=40, block_length=16, steps=8, threshold=0.3, regime=regime)
        runs[regime] = engine.generate(prompt, cfg)
    assert runs["full"].tokens == runs["block-kv"].tokens
    assert runs["full"].steps_per_block == runs["block-kv"].steps_per_block
    assert len(runs["full"].tokens) == 40


def test_prompt_validation(tiny_dir):
    engine = load(tiny_dir)
    with pytest.raises(ValueError, match="empty"):
        engine.generate([], DecodeConfig())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([1, 999], DecodeConfig())
