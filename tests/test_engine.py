"""Engine wiring on the CPU: fit checks, a failed configure that leaves a usable engine, the accelerate peer's
memory, random presets with a tokenizer."""

import gc
import weakref

import pytest
import torch

import tide.baselines  # noqa: F401
import tide.experts.store as st
from tide.config import DecodeConfig
from tide.engine import load

CFG = DecodeConfig(gen_length=16, block_length=16, steps=8, threshold=0.5)


def test_budget_that_does_not_fit_is_one_sentence_and_names_what_fits(tiny_dir, monkeypatch):
    engine = load(tiny_dir, policy="lru", gpu_budget="2/layer")
    per_layer = len(engine.store.layers) * engine.store.expert_bytes
    room = 5 * per_layer + engine.staging * engine.store.expert_bytes - engine.store.device_bytes
    monkeypatch.setattr(st, "free_bytes", lambda device: room)
    monkeypatch.setattr("tide.engine.free_bytes", lambda device: room)
    with pytest.raises(st.DeviceMemoryError, match="needs 8 expert slots per layer.*at most 5/layer fits"):
        engine.configure("lru", "8/layer")
    engine.configure("lru", "5/layer")  # what the message says fits, fits
    assert engine.store.slots == 5 and engine.run(engine.encode("hi"), CFG)["tokens"]


def test_failed_configure_leaves_an_engine_that_says_so_and_recovers(tiny_dir, monkeypatch):
    engine = load(tiny_dir, policy="lru", gpu_budget="2/layer")
    real = engine.store._allocate

    def oom(rows, ring_rows):
        if rows == 6:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows, ring_rows)

    monkeypatch.setattr(engine.store, "_allocate", oom)
    with pytest.raises(st.DeviceMemoryError):
        engine.configure("lru", "6/layer")
    with pytest.raises(ValueError, match="no policy configured"):
        engine.run(engine.encode("hi"), CFG)
    engine.configure("tide", "3/layer", refresh_interval=2)
    assert engine.run(engine.encode("hi"), CFG)["tokens"]


def test_accelerate_peer_frees_its_bank_on_close(tiny_dir):
    from accelerate.hooks import ModelHook

    engine = load(tiny_dir, policy="accelerate", gpu_budget="4/layer")
    bank = weakref.ref(engine.executor.bank)
    assert any(isinstance(getattr(m, "_hf_hook", None), ModelHook) for m in engine.executor.bank.modules())
    engine.run(engine.encode("hi"), CFG)
    engine.configure("lru", "4/layer")  # closes the peer, collects its cycles
    gc.collect()
    assert bank() is None


def test_random_mini_checkpoints_have_a_tokenizer(tmp_path):
    from tide.checkpoint import load_tokenizer, write_byte_tokenizer
    from tide.config import preset

    cfg = preset("mini")  # the official ids: pad = eos = 156892, mask 156895
    write_byte_tokenizer(tmp_path, cfg)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("def f():", add_special_tokens=False)
    assert ids == list(b"def f():") and tok.decode(ids) == "def f():"
    assert tok.eos_token_id == 156892 == tok.pad_token_id and tok.convert_tokens_to_ids("<|mask|>") == 156895


def test_truncated_presets_are_written_at_their_size(tmp_path, monkeypatch):
    import tide.hub as hub

    monkeypatch.setattr(hub, "cache_dir", lambda: tmp_path)
    path = hub.resolve_model("preset:tiny", layers=2)
    assert path == tmp_path / "tiny-2layers-random" and '"num_hidden_layers": 2' in (path / "config.json").read_text()
    assert (path / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="only a preset:NAME model can be truncated"):
        hub.resolve_model(str(path), layers=2)


@pytest.mark.parametrize("policy,options", [("reference", {}), ("lru", {}), ("full-offload", {}), ("accelerate", {}),
                                            ("cpu-fallback", {"cpu_threads": 2}), ("tide", {"refresh_interval": 2})])
def test_every_inference_entry_point_runs_without_autograd_whatever_the_caller(tiny_dir, policy, options):
    """Under the caller's grad mode (enabled here, as in a plain script), the model called directly, a run and the
    teacher-forced probe all work, hold no graph, and no weight asks for a gradient. The host workers' threads
    included: grad mode is per thread."""
    from tide.evals.lossless import teacher_forced_logits
    from tide.policy import StepInfo

    engine = load(tiny_dir, policy=policy, gpu_budget=None if policy == "reference" else "4/layer", **options)
    assert not any(p.requires_grad for p in engine.model.parameters())
    ids = engine.encode("def add(a, b):")
    with torch.enable_grad():
        logits = engine.model(torch.tensor([ids]), 0, None, at=StepInfo(0, 0))
        tokens = engine.run(ids, CFG)["tokens"]
        probe = teacher_forced_logits(engine, ids, tokens, 8)
    assert tokens and not logits.requires_grad and not probe.requires_grad
    assert engine.executor.counters.records[-1].pairs_cpu or policy not in ("cpu-fallback",)


def test_a_batch_that_does_not_fit_is_refused_with_the_largest_that_fits(tiny_dir, monkeypatch):
    from tide.decode import Request
    from tide.experts.store import DeviceMemoryError

    engine = load(tiny_dir, policy="reference", dtype="float32")
    requests = [Request(list(range(1, 1 + n)), DecodeConfig(gen_length=16, block_length=8)) for n in (3, 9, 20, 30)]
    needs = sorted((engine.request_bytes(r) for r in requests), reverse=True)
    assert needs[0] > needs[-1] > 0  # longer requests hold more (KV cache, scores)
    monkeypatch.setattr("tide.engine.free_bytes", lambda device: needs[0] + needs[1] + needs[2] // 2)
    with pytest.raises(DeviceMemoryError, match="largest batch size that fits is 2"):
        engine.run_batch(requests, 4)
    assert engine.run_batch(requests, 2)["stats"]["requests"] == 4  # two at a time fits
