"""The lm-eval integration: the registered model and its conventions, `tide eval` through one engine, identity."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install .[dev])")

import tide.baselines  # noqa: E402, F401
from tide.cli import main  # noqa: E402
from tide.engine import load  # noqa: E402
from tide.evals.harness import EvalSpec, run_eval, task_manager  # noqa: E402
from tide.evals.lm_eval_model import TideLM  # noqa: E402
from tide.hub import BUILTIN_MODEL  # noqa: E402

TASKS = ["tide_arith", "tide_arith_mc"]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<|bot|>{% endif %}")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def chat_dir(tiny_dir, tmp_path_factory):
    """The tiny checkpoint with a chat template in its tokenizer_config.json."""
    path = tmp_path_factory.mktemp("chat") / "m"
    shutil.copytree(tiny_dir, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


def test_registered_name():
    from lm_eval.api.registry import get_model

    assert get_model("tide") is TideLM


def test_lm_eval_arguments_are_accepted_and_unknown_ones_named(tiny_dir):
    lm = TideLM.create_from_arg_string(f"pretrained={tiny_dir},policy=lru,gpu_budget=4/layer",
                                       {"batch_size": 1, "max_batch_size": None, "device": "cpu"})
    assert lm.engine.store.slots == 4 and lm.rank == 0 and lm.world_size == 1
    with pytest.raises(ValueError, match="unknown model_args.*'colour'"):
        TideLM.create_from_arg_string(f"pretrained={tiny_dir},colour=red")

def test_lm_eval_default_cuda_device_falls_back_to_the_cpu_with_a_warning(tiny_dir, caplog):
    """lm-eval's --device defaults to cuda:0; on a machine without CUDA the model runs on the CPU and says so."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with caplog.at_level("WARNING", logger="tide"):
        lm = TideLM.create_from_arg_string(f"pretrained={tiny_dir},policy=lru,gpu_budget=4/layer",
                                           {"device": "cuda:0"})
    assert next(lm.engine.model.parameters()).device.type == "cpu"
    assert "CUDA is not available here: running on the CPU" in caplog.text


def test_decode_settings_task_versus_model(tiny_dir):
    engine = load(tiny_dir)
    task = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
    lm = TideLM(engine=engine, gen_length=8, temperature=0.7)
    assert lm.decode_config(task, [1, 2]).gen_length == 16  # lm-eval convention: the task's gen_kwargs win
    assert lm.decode_config(task, [1, 2]).temperature == 0.0  # do_sample=False is greedy
    assert lm.decode_config({}, [1, 2]).gen_length == 8 and lm.decode_config({}, [1, 2]).temperature == 0.7
    paper = TideLM(engine=engine, gen_length=8, do_sample=True, decode_from="model")
    cfg = paper.decode_config(task, [1, 2])
    assert cfg.gen_length == 8 and cfg.temperature == 1.0  # the model governs; do_sample at T=0 samples at T=1
    assert cfg.seed == paper.decode_config(task, [1, 2]).seed != paper.decode_config(task, [1, 3]).seed
    with pytest.raises(ValueError, match="decode_from"):
        TideLM(engine=engine, decode_from="both")


def test_eval_one_engine_identity_and_a_lossy_run_is_caught(tiny_dir, tmp_path, monkeypatch):
    """Every policy through one loaded engine (counted), sampling on, each held to the lossless contract; a slot
    bug injected into tide's run (its fetched slots zeroed) is caught by the tier-matched replay (level b)."""
    import tide.engine
    import tide.experts.store

    counts = {"load": 0, "store": 0}
    real_load, real_init = tide.engine.load, tide.experts.store.ExpertStore.__init__
    real_copy = tide.experts.store.ExpertStore._copy
    bug = {"on": False}

    def counting_load(*a, **k):
        counts["load"] += 1
        return real_load(*a, **k)

    def counting_init(self, *a, **k):
        counts["store"] += 1
        real_init(self, *a, **k)

    def slot_bug(self, dst, src, key):  # a copy into a resident slot that writes zeros; the staging ring is fine
        real_copy(self, dst, src * 0 if bug["on"] and key[0] != "ring" else src, key)

    monkeypatch.setattr(tide.engine, "load", counting_load)
    monkeypatch.setattr(tide.experts.store.ExpertStore, "__init__", counting_init)
    monkeypatch.setattr(tide.experts.store.ExpertStore, "_copy", slot_bug)
    seen = []

    def on_run(run, table):
        seen.append(run)
        assert counts == {"load": 1, "store": 1}, counts  # one engine, one expert store, at every run
        bug["on"] = run.policy == "cpu-fallback"  # the run after it (tide) fetches into broken slots

    spec = EvalSpec(model=str(tiny_dir), tasks=TASKS, policies=["reference", "lru", "cpu-fallback", "tide"],
                    budgets=["4/layer"], limit=3, decode={"gen_length": 8, "temperature": 1.0, "do_sample": True},
                    mc_samples=2, out=str(tmp_path / "e"))
    summary = run_eval(spec, on_run=on_run)[0]
    assert [r.policy for r in seen] == ["reference", "lru", "cpu-fallback", "tide"]
    table = pd.read_csv(tmp_path / "e" / "eval.csv")
    assert set(table.task) == set(TASKS) and {"exact_match", "acc"} <= set(table.metric)
    for col in ("tokens_per_s", "forwards", "mb_h2d", "gpu_hit_ratio", "stderr", "token_agreement"):
        assert col in table
    levels = dict(zip(table.policy, table.lossless_level, strict=False))
    assert levels["lru"] == "a" and levels["cpu-fallback"] == levels["tide"] == "b"
    fallback = table[table.policy == "cpu-fallback"]
    assert (fallback.identical_to_tier_matched == 1.0).all() and fallback.lossless.all()
    assert (table[table.policy == "lru"].identical_fraction == 1.0).all()
    assert (table[table.policy == "reference"].is_comparison).all()
    tide_rows = table[table.policy == "tide"]
    assert (tide_rows.identical_to_tier_matched < 1.0).any()  # the slot bug, caught at level b
    assert summary["against"] == "reference" and summary["lossy"] == ["tide@4/layer/block-kv"]
    assert "**LOSSY policies: tide**" in (tmp_path / "e" / "eval.md").read_text()
    assert list((tmp_path / "e" / "lm_eval").iterdir())  # lm-eval's own results files, one folder per run


def test_eval_cli_gen_length_chat_template_and_samples(chat_dir, tmp_path):
    def generated(out):
        df = pd.read_csv(out / "eval.csv")
        return int(df[df.task == "tide_arith"].generated_tokens.iloc[0])

    args = ["eval", "--model", chat_dir, "--tasks", "tide_arith", "--policies", "lru", "--budgets", "4/layer",
            "--limit", 2]
    res = cli(*args, "--gen-length", 4, "--out", tmp_path / "short")
    assert res.exit_code == 0, res.output
    res = cli(*args, "--out", tmp_path / "long", "--apply-chat-template", "--log-samples")
    assert res.exit_code == 0, res.output
    assert generated(tmp_path / "short") == 8 < generated(tmp_path / "long")  # 2 samples x 4 tokens
    samples = list((tmp_path / "long" / "lm_eval").rglob("samples_tide_arith_*.jsonl"))
    assert samples and "<|user|>" in samples[0].read_text() and "<|bot|>" in samples[0].read_text()


def test_eval_errors_are_sentences(tiny_dir, tmp_path):
    res = cli("eval", "--model", tiny_dir, "--tasks", "tide_arithh", "--out", tmp_path / "x")
    assert res.exit_code == 2 and "unknown task 'tide_arithh'" in res.output and "did you mean tide_arith" in res.output
    res = cli("eval", "--model", tiny_dir, "--tasks", "tide_arith", "--apply-chat-template", "--limit", 1,
              "--policies", "lru", "--out", tmp_path / "y")
    assert res.exit_code == 2 and "no chat template" in res.output
    res = cli("eval", "--model", tiny_dir, "--tasks", "tide_mbpp_sanitized", "--data", tmp_path / "none.json",
              "--out", tmp_path / "z")
    assert res.exit_code == 2 and "none.json" in res.output


def test_tide_lm_eval_console_script(tmp_path):
    """lm-eval's own CLI, with every flag of the issue's example, writes results and samples."""
    exe = Path(sys.executable).with_name("tide-lm-eval")
    out = tmp_path / "out"
    done = subprocess.run([str(exe), "--model", "tide", "--model_args", f"pretrained={BUILTIN_MODEL},policy=lru,"
                           "gpu_budget=50%,gen_length=8", "--tasks", "tide_arith", "--limit", "2", "--batch_size", "1",
                           "--device", "cpu", "--log_samples", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(out.rglob("samples_tide_arith_*.jsonl")) and list(out.rglob("results_*.json"))
    assert "exact_match" in done.stdout


def test_likelihood_bound_is_exact_for_constant_log_probs(tiny_dir, monkeypatch):
    """With every token at log p = -log V, the bound is -L log V for every L: exact subsets and Monte Carlo."""
    lm = TideLM(engine=load(tiny_dir), mc_samples=7, seed=3)
    vocab = lm.engine.config.vocab_size
    monkeypatch.setattr(lm.engine.model, "forward", lambda x, *a, **k: torch.zeros(1, x.shape[1], vocab))
    for length in (1, 3, 5):  # 3: all 7 subsets; 5: 31 subsets > 7, so Monte Carlo
        value, _ = lm.score([1, 2, 3], list(range(4, 4 + length)))
        assert value == pytest.approx(-length * math.log(vocab))
    assert lm.exact(3) and not lm.exact(5)


def test_likelihood_is_deterministic_and_shares_draws_across_choices(tiny_dir):
    lm = TideLM(mc_samples=4, engine=load(tiny_dir), seed=3)
    ctx = lm.tok_encode("12+35=")
    a, b = lm.score(ctx, lm.tok_encode("047")), lm.score(ctx, lm.tok_encode("047"))
    assert a == b and a[0] < 0
    with pytest.raises(ValueError, match="non-empty"):
        lm.score([], lm.tok_encode("047"))


def test_task_yamls_load_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manager = task_manager()
    assert {"tide_arith", "tide_arith_mc", "tide_humaneval", "tide_mbpp_sanitized"} <= set(manager.all_tasks)
    assert "gsm8k" in manager.all_tasks  # lm-eval's own tasks are there too
    tasks = manager.load(["tide_arith_mc", "tide_humaneval"])["tasks"]
    assert len(list(tasks["tide_humaneval"].test_docs())) == 164
    mc = list(tasks["tide_arith_mc"].test_docs())
    assert len(mc) == 200 and {d["family"] for d in mc} == {"add", "copy", "rev"}
    for d in mc:  # the right answer at the label; distractors distinct and as wide as it ("042")
        answer = d["choices"][d["label"]]
        if d["family"] == "add":
            assert int(answer) == sum(int(x) for x in d["prompt"][:-1].split("+"))
        else:
            digits = d["prompt"].split()[1][:-1]
            assert answer == (digits if d["family"] == "copy" else digits[::-1])
        assert len(set(d["choices"])) == len(d["choices"]) >= 3 and len({len(c) for c in d["choices"]}) == 1


def test_generate_chat_flag(chat_dir, tiny_dir):
    res = cli("generate", "--model", chat_dir, "--prompt", "hi", "--chat", "--gen-length", 8, "--json")
    assert res.exit_code == 0, res.output
    res = cli("generate", "--model", tiny_dir, "--prompt", "hi", "--chat", "--gen-length", 8)
    assert res.exit_code == 2 and "no chat template" in res.output


@pytest.mark.parametrize("args,phrase", [("gen_length=-5", "gen_length"), ("mc_samples=0", "mc_samples"),
                                         ("mc_samples=abc", "mc_samples"), ("temperature=-1", "temperature"),
                                         ("steps=0", "steps")])
def test_bad_model_args_are_refused_before_any_request(tiny_dir, args, phrase):
    with pytest.raises(ValueError, match=phrase):
        TideLM.create_from_arg_string(f"pretrained={tiny_dir},{args}", {"device": "cpu"})


def test_device_in_model_args_wins_over_lm_evals_own(tiny_dir):
    lm = TideLM.create_from_arg_string(f"pretrained={tiny_dir},policy=lru,gpu_budget=4/layer,device=cpu",
                                       {"device": "cuda:0", "batch_size": 1})
    assert next(lm.engine.model.parameters()).device.type == "cpu"
    # lm-eval's CLI takes the dict path (model_args parsed before the model is made)
    lm = TideLM.create_from_arg_obj({"pretrained": str(tiny_dir), "policy": "lru", "gpu_budget": "4/layer",
                                     "device": "cpu"}, {"device": "cuda:0", "batch_size": 1})
    assert next(lm.engine.model.parameters()).device.type == "cpu"


def test_lm_eval_batch_size_gives_the_same_outputs_as_one_at_a_time():
    """lm-eval's batch_size=4 decodes generate_until's requests 4 per forward and packs 4 of loglikelihood's masked
    copies per forward: per sample the same outputs as batch_size=1, on the built-in model and its tasks
    (tide_arith, tide_arith_mc through lm-eval's own evaluator). Likelihoods are float32 sums over GEMMs of more
    rows, so they are compared at 1e-5 (measured here: ~1e-7 relative); choices and greedy flags exactly."""
    from lm_eval import simple_evaluate

    outputs, stats, results = {}, {}, {}
    for batch in (1, 4):
        lm = TideLM.create_from_arg_string("dtype=float32,gen_length=16,block_length=8,steps=8,mc_samples=4",
                                           {"batch_size": str(batch), "device": "cpu"})
        out = simple_evaluate(model=lm, tasks=["tide_arith", "tide_arith_mc"], limit=9, task_manager=task_manager(),
                              bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              log_samples=True)
        outputs[batch] = {(r["task"], r["doc_id"], r["idx"]): r["output"] for r in lm.records}
        stats[batch] = {kind: [r["stats"] for r in lm.records if r["kind"] == kind]
                        for kind in ("generate", "loglikelihood")}
        results[batch] = {(t, s["doc_id"]): {k: v for k, v in s.items() if k in ("acc", "exact_match")}
                          for t, samples in out["samples"].items() for s in samples}
    generated = {k: v for k, v in outputs[1].items() if k[0] == "tide_arith"}
    assert len(generated) == 9 and all(outputs[4][k] == v for k, v in generated.items())
    scored = {k: v for k, v in outputs[1].items() if k[0] == "tide_arith_mc"}
    assert len(scored) >= 18 and scored.keys() == {k for k in outputs[4] if k[0] == "tide_arith_mc"}
    for key, (ll, greedy) in scored.items():
        assert outputs[4][key][1] == greedy and outputs[4][key][0] == pytest.approx(ll, rel=1e-5, abs=1e-5), key
    assert results[4] == results[1]  # per-sample metrics
    gen = {b: stats[b]["generate"] for b in (1, 4)}
    assert sum(s["generated_tokens"] for s in gen[1]) == sum(s["generated_tokens"] for s in gen[4])
    for kind in ("generate", "loglikelihood"):  # fewer forwards: each serves several requests (or copies)
        assert sum(s["forwards"] for s in stats[4][kind]) < sum(s["forwards"] for s in stats[1][kind])
    for bad in ("0", "two", 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            TideLM.create_from_arg_string("dtype=float32", {"batch_size": bad})


def test_lm_eval_batch_size_auto_picks_the_largest_that_fits(monkeypatch):
    """batch_size=auto: the largest batch up to max_batch_size whose requests fit the free memory now."""
    from lm_eval.api.instance import Instance

    import tide.engine
    from tide.decode import Request

    lm = TideLM.create_from_arg_string("dtype=float32,gen_length=8,block_length=8,steps=8",
                                       {"batch_size": "auto", "max_batch_size": 3, "device": "cpu"})
    reqs = [Instance("generate_until", {}, (f"{i} + {i} =", {"until": ["\n"]}), i) for i in range(5)]
    lm.generate_until(reqs)
    assert lm.chosen_batch_sizes == [3]  # the host has room for all: max_batch_size caps it
    one = lm.engine.request_bytes(Request(lm.tok_encode("1 + 1 ="), lm.decode_config({}, [1])))
    monkeypatch.setattr(tide.engine, "free_bytes", lambda device: int(2.5 * one))
    lm.generate_until(reqs)
    assert lm.chosen_batch_sizes[-1] == 2
