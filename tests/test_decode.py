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


def _requests(vocab: int, regime: str) -> list:
    """Seven requests: prompt lengths 3-40 (mid-block and block-aligned), gen lengths 8-40, greedy and sampled."""
    import random

    from tide.decode import Request

    rng = random.Random(0)
    out = []
    for i, P in enumerate((3, 8, 17, 40, 5, 24, 11)):
        prompt = [rng.randrange(1, vocab // 2) for _ in range(P)]
        cfg = DecodeConfig(gen_length=(8, 16, 40)[i % 3], block_length=8, steps=4, regime=regime, seed=i,
                           temperature=0.0 if i % 2 else 0.7)
        out.append(Request(prompt, cfg))
    return out


@pytest.mark.parametrize("regime", ["block-kv", "full"])
def test_a_batch_decodes_each_request_to_its_tokens_alone(tiny_dir, regime):
    """Different prompt lengths, gen lengths, sampling and early EOS: batched (continuously, 3 at a time, and all
    at once) each request gets exactly the tokens it gets alone, in float32 on the CPU."""
    from tide.decode import generate_batch

    engine = load(tiny_dir, policy="reference", dtype="float32")
    requests = _requests(engine.config.vocab_size, regime)
    from collections import Counter

    engine.eos_id = None  # then the token the random model emits most often: some requests stop early
    engine.eos_id = Counter(t for r in requests for t in engine.generate(r.prompt, r.cfg).tokens).most_common(1)[0][0]
    alone = [engine.generate(r.prompt, r.cfg) for r in requests]
    assert any(len(g.tokens) < r.cfg.gen_length for g, r in zip(alone, requests, strict=True))  # early EOS
    assert any(len(g.tokens) == r.cfg.gen_length for g, r in zip(alone, requests, strict=True))
    for batch in (3, 7):
        together = generate_batch(engine.model, requests, batch, engine.mask_id, engine.eos_id)
        assert [g.tokens for g in together] == [g.tokens for g in alone], batch
        assert [g.steps_per_block for g in together] == [g.steps_per_block for g in alone]
        assert [g.forwards for g in together] == [g.forwards for g in alone]


def test_continuous_batching_admits_and_retires_by_step_counts(tiny_dir):
    """Never more than batch_size requests per forward; a finished request's place goes to the next waiting one
    before the next forward; the same requests give the same schedule (every StepInfo) twice."""
    from tide.decode import Request

    engine = load(tiny_dir, policy="lru", gpu_budget="4/layer", dtype="float32")
    requests = _requests(engine.config.vocab_size, "block-kv")
    schedules = []
    for _ in range(2):
        seen = []
        policy_plan = engine.executor.policy.plan
        engine.executor.policy.plan = lambda at, *a, _p=policy_plan, _s=seen: (_s.append(at), _p(at, *a))[1]
        engine.run_batch([Request(r.prompt, r.cfg) for r in requests], 3)
        engine.executor.policy.plan = policy_plan
        schedules.append(seen)
    assert schedules[0] == schedules[1]
    denoise = [at for at in schedules[0] if at.kind == "denoise"]
    assert max(at.requests for at in denoise) == 3 and min(at.requests for at in denoise) >= 1
    # the batch stays full while requests wait: 7 requests, 3 at a time, so the first forwards carry 3
    assert [at.requests for at in denoise[:3]] == [3, 3, 3]
    steps = [(at.block, at.step) for at in denoise if at.layer == denoise[0].layer]
    assert steps == [(f // 4, f % 4) for f in range(len(steps))]  # the batch's clock: every forward counts


def test_run_batch_counts_the_batch_forwards(tiny_dir):

    engine = load(tiny_dir, policy="reference", dtype="float32")
    requests = _requests(engine.config.vocab_size, "block-kv")[:4]
    one = engine.run(requests[0].prompt, requests[0].cfg)
    assert one["stats"]["forwards"] == engine.generate(requests[0].prompt, requests[0].cfg).forwards
    alone = engine.run_batch(requests, 1)["stats"]
    together = engine.run_batch(requests, 4)["stats"]
    assert together["generated_tokens"] == alone["generated_tokens"]
    assert together["forwards"] < alone["forwards"]  # a forward serves every request in it
    with pytest.raises(ValueError, match="batch size"):
        engine.run_batch(requests, 0)


def test_a_profile_for_a_batch_decodes_that_many_distinct_prompts_per_forward(tiny_dir):
    """TIDE plans R from a profile at the batch size it runs at: one distinct prompt per request, batched."""
    from tide.config import PROFILE_PROMPTS, PROFILE_REQUESTS, DecodeConfig

    assert len(set(PROFILE_PROMPTS)) == len(PROFILE_PROMPTS) >= 16
    engine = load(tiny_dir, policy="reference", dtype="float32")
    cfg = DecodeConfig(gen_length=16, block_length=8, steps=8)
    k, L = engine.config.num_experts_per_tok, cfg.block_length
    for batch in (1, 4):
        _, trace = engine.profile_routing("4/layer", None, cfg, batch)
        first = next(r for r in trace.records if r.kind == "denoise")
        assert sum(first.counts.values()) == batch * L * k  # the first forward routes every request's block
        assert f"profiled on {max(PROFILE_REQUESTS, batch)} prompt(s), batch size {batch}" in engine.notes[-1]
